"""The garbage collector and a long-running server.

A full collection walks every tracked object. A server holds hundreds of thousands
that live as long as it does (modules, models, librosa's kernels), and a burst of
work (an event for 500 subscribers) allocates thousands more, so a collection in
the middle of it stalls the event loop: 67 ms for a full one with librosa loaded,
and the p99 of an event's way to 500 subscribers went from 21.5 ms (collector off)
to 145 ms (as Python sets it), on the machines of docs/performance.md.

``settle_heap`` moves what is alive into the collector's permanent generation, which
it never scans, and makes the youngest generation ten thousand objects deep rather
than seven hundred, so that a burst is mostly over before a collection starts and
the older generations are collected far less often (23 ms p99). Memory the cycles
hold is still reclaimed, later.

Only a process that is a Sparrow server (``sparrow serve``, ``sparrow worker``) says
so with ``own_heap()``; elsewhere (the tests, an application embedding Sparrow)
``settle_heap`` leaves the collector as it is: frozen objects are never freed.
"""

from __future__ import annotations

import gc

YOUNG = 10_000  # allocations between young collections (Python's default: 700)
MIDDLE = 20  # young collections between middle ones (10)
OLD = 100  # middle collections between full ones (10)


_owned = False


def own_heap() -> None:
    """This process is a Sparrow server, for as long as it runs."""
    global _owned
    _owned = True


def settle_heap() -> None:
    """In a server process, collect once, leave every object alive now out of later
    collections, and collect less often (called once what lives for good is loaded: at
    start-up, after a warm-up); elsewhere nothing."""
    if not _owned:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
