"""Sparrow Studio in a real browser: Debian's Chromium driven by Playwright against a
real ``sparrow serve`` with the mock engine (SPEC §13).

Each test watches the page from its first request: console messages, failed
requests and requests to any other host are failures unless the test provoked them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from faults import wait_until
from helpers import SAMPLE
from live import free_port, server_process, sparrow_cli
from playwright.sync_api import Browser, Locator, Page, ViewportSize, expect
from probe import ffprobe
from studio import chromium, node, open_studio, upload

from sparrow.audio.loudness import Loudness, measure

pytestmark = pytest.mark.slow

LAPTOP: ViewportSize = {"width": 1366, "height": 860}
MOCK = {"SPARROW_ENGINE": "mock", "SPARROW_MOCK_STEP_MS": "10", "SPARROW_MAX_BRANCH_S": "60"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with server_process(tmp_path / "data", port, log=tmp_path / "server.log", **MOCK):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def api(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served, timeout=10) as client:
        yield client


def own(card: Locator, testid: str) -> Locator:
    """A control of this node's own card, not of its descendants'."""
    return card.locator(f":scope > .card [data-testid={testid}]")


def children(page: Page, parent_id: str) -> Locator:
    return page.locator(f"[data-node-id='{parent_id}'] > .children > [data-testid=node]")


def open_chain_id(page: Page) -> str:
    expect(page).to_have_url(re.compile(r"#chain=\w+$"))
    return page.url.rsplit("=", 1)[1]


def loudness_of(path: Path) -> Loudness:
    """FFmpeg's EBU R128 measure, on a thread of its own: Playwright's loop runs in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, measure(path)).result()


def js_number(value: float) -> str:
    """``value`` as JavaScript's String() writes it (8.0 is "8")."""
    return str(int(value)) if value == int(value) else repr(value)


def spine_duration(page: Page) -> float:
    return float(page.get_by_test_id("spine").get_attribute("data-duration-s") or "nan")


def branch(page: Page, prompt: str, *, duration: str, count: str = "1") -> None:
    page.get_by_label("One for all").check()
    page.get_by_test_id("branch-prompt").fill(prompt)
    page.get_by_test_id("branch-count").fill(count)
    page.get_by_test_id("branch-duration").fill(duration)
    page.get_by_test_id("branch-submit").click()


def test_the_musicians_journey_end_to_end(
    browser: Browser, served: str, api: httpx.Client, tmp_path: Path
) -> None:
    page, watched = open_studio(browser, served, viewport=LAPTOP)

    # Upload with the file picker: the chain is listed and opened, its root drawn.
    upload(page, SAMPLE)
    expect(page.get_by_test_id("chain-item")).to_have_count(1)
    expect(page.get_by_test_id("chain-list")).to_contain_text("sample")
    chain_id = open_chain_id(page)
    root = api.get(f"/api/chains/{chain_id}").json()["nodes"][0]
    root_card = node(page, root["id"])
    expect(root_card.locator(".surface canvas").first).to_be_attached()
    # The analysis arrives later, live, by its own event.
    expect(root_card.locator(".analysis")).to_contain_text("LUFS", timeout=30_000)

    # A click on the waveform halfway chooses from_s; one prompt per sibling.
    surface = root_card.locator(".surface")
    box = surface.bounding_box()
    assert box is not None
    surface.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    from_s = float(page.locator("input[name=from_s]").input_value())
    assert abs(from_s - root["duration_s"] / 2) < 0.25, from_s
    page.get_by_label("One per sibling").check()
    page.get_by_test_id("branch-prompt").fill("bright marimba\ndark cello")
    expect(page.get_by_test_id("branch-count")).to_have_value("2")
    page.get_by_test_id("branch-duration").fill("3")
    page.get_by_test_id("branch-submit").click()

    # Live: queued → generating (with progress) → ready, with no reload of the page.
    kids = children(page, root["id"])
    expect(kids).to_have_count(2)
    expect(kids.first).to_have_attribute("data-status", re.compile("queued|generating"))
    expect(kids.first.locator(".eta")).to_contain_text("%", timeout=10_000)
    for i in range(2):
        expect(kids.nth(i)).to_have_attribute("data-status", "ready", timeout=30_000)
    titles = {kids.nth(i).locator(":scope > .card .node-title").inner_text() for i in range(2)}
    assert titles == {"bright marimba", "dark cello"}
    made = [n for n in api.get(f"/api/chains/{chain_id}").json()["nodes"] if n["parent_id"]]
    assert sorted(n["prompt"] for n in made) == ["bright marimba", "dark cello"]
    assert all(abs(n["from_s"] - from_s) < 1e-6 for n in made)
    assert watched.loads == 1

    # Commit one: the spine grows to what the API says it plays.
    first, second = kids.nth(0), kids.nth(1)
    first_id = first.get_attribute("data-node-id")
    own(first, "commit").click()
    expect(first).to_have_attribute("data-committed", "true")
    spine = api.get(f"/api/chains/{chain_id}/spine").json()
    assert [e["node"]["id"] for e in spine["nodes"]] == [root["id"], first_id]
    expect(page.get_by_test_id("spine")).not_to_have_attribute(
        "data-duration-s", js_number(root["duration_s"])
    )
    assert abs(spine_duration(page) - spine["duration_s"]) < 1e-6

    # The spine plays.
    play = page.get_by_role("button", name="Play the spine")
    play.click()
    expect(play).to_have_text("Pause", timeout=10_000)
    expect(page.locator("#spine .clock")).not_to_have_text(re.compile(r"^0:00\.00 /"))
    play.click()
    expect(play).to_have_text("Play")

    # Export: FLAC, no crossfade, downloaded, every played frame in it.
    page.get_by_test_id("export-format").select_option("flac")
    page.locator("#export-form input[name=crossfade_ms]").fill("0")
    with page.expect_download() as download:
        page.get_by_test_id("export-submit").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    probed = ffprobe(saved)
    assert probed["codec_name"] == "flac"
    seconds = probed["decoded_samples"] / int(probed["sample_rate"])
    assert abs(seconds - spine["duration_s"]) < 2 / int(probed["sample_rate"]) + 1e-6

    # And an MP3 at a chosen loudness, with the default crossfade.
    page.get_by_test_id("export-format").select_option("mp3")
    page.locator("#export-form input[name=crossfade_ms]").fill("20")
    page.locator("#export-form input[name=loudness_lufs]").fill("-16")
    with page.expect_download(timeout=60_000) as download:
        page.get_by_test_id("export-submit").click()
    louder = tmp_path / f"loud-{download.value.suggested_filename}"
    download.value.save_as(louder)
    assert ffprobe(louder)["codec_name"] == "mp3"
    level = loudness_of(louder)
    assert abs(level.integrated_lufs + 16) <= 1 and level.true_peak_dbtp <= -0.8, level

    # Cancel a long continuation of the committed node while it generates.
    own(first, "branch-from").click()
    expect(page.locator("#branch-parent")).to_contain_text("from its end")
    branch(page, "a very long coda", duration="60")
    long_one = children(page, first_id or "")
    expect(long_one).to_have_count(1)
    expect(long_one).to_have_attribute("data-status", "generating", timeout=10_000)
    own(long_one, "cancel").click()
    expect(long_one).to_have_attribute("data-status", "cancelled", timeout=10_000)

    # Discard the sibling; uncommit the committed node: the spine is the upload again.
    own(second, "discard").click()
    expect(children(page, root["id"])).to_have_count(1)
    own(first, "uncommit").click()
    expect(first).to_have_attribute("data-committed", "false")
    expect(page.get_by_test_id("spine")).to_have_attribute(
        "data-duration-s", js_number(root["duration_s"])
    )

    # Stems (auth off: the local user may): a player per stem.
    own(root_card, "stems").click()
    players = root_card.locator("[data-testid=stem]")
    expect(players).to_have_count(4, timeout=30_000)
    for i in range(4):
        expect(players.nth(i).locator("audio")).to_have_attribute("src", re.compile("^blob:"))
    assert sorted(players.nth(i).get_attribute("data-stem") or "" for i in range(4)) == [
        "bass",
        "drums",
        "other",
        "vocals",
    ]

    assert watched.loads == 1
    watched.assert_clean()


def test_a_clip_dropped_on_the_page_starts_a_chain(browser: Browser, served: str) -> None:
    page, watched = open_studio(browser, served, viewport=LAPTOP)
    dropped = page.evaluate_handle(
        """(bytes) => {
            const transfer = new DataTransfer();
            const file = new File([new Uint8Array(bytes)], "dropped.flac", {type: "audio/flac"});
            transfer.items.add(file);
            return transfer;
        }""",
        list(SAMPLE.read_bytes()),
    )
    page.locator("#upload-form").dispatch_event("drop", {"dataTransfer": dropped})
    expect(page.locator("[data-testid=node][data-status=ready]")).to_have_count(1, timeout=20_000)
    expect(page.get_by_test_id("chain-item")).to_have_text(re.compile("^dropped"))
    watched.assert_clean()


def test_the_apis_sentences_are_shown_next_to_what_caused_them(
    browser: Browser, served: str, api: httpx.Client, tmp_path: Path
) -> None:
    page, watched = open_studio(browser, served, viewport=LAPTOP)

    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("not a clip\n" * 50)
    expected = api.post("/api/chains", files={"file": ("notes.txt", not_audio.read_bytes())})
    page.get_by_test_id("upload-input").set_input_files(not_audio)
    expect(page.locator("#upload-form .error")).to_have_text(expected.json()["detail"])

    upload(page, SAMPLE)
    chain_id = open_chain_id(page)
    root_id = api.get(f"/api/chains/{chain_id}").json()["chain"]["root_node_id"]
    too_long = api.post(f"/api/nodes/{root_id}/branch", json={"prompt": "x", "duration_s": 100})
    branch(page, "x", duration="100")  # the form allows 120; this server 60
    expect(page.locator("#branch-form .error")).to_have_text(too_long.json()["detail"])
    expect(page.get_by_test_id("node")).to_have_count(1)

    assert sorted(watched.failed_loads()) == sorted([expected.status_code, too_long.status_code])
    assert watched.failed == [] and watched.elsewhere == []


def test_events_reconnect_replay_what_was_missed_and_a_reset_reloads(
    browser: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The server goes away under the page and comes back. Missed events still in the
    log are replayed (no reload of the chain); once the log no longer holds them, the
    server's `reset` has the page reload the chain."""
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base, timeout=10)
    request.addfinalizer(api.close)

    with server_process(data, port, log=tmp_path / "server.log", **MOCK) as first:
        page, watched = open_studio(browser, base, viewport=LAPTOP)
        context = page.context
        upload(page, SAMPLE)
        chain_id = open_chain_id(page)
        root_id = api.get(f"/api/chains/{chain_id}").json()["chain"]["root_node_id"]
        expect(page.locator("#live")).to_have_text("● live")
        context.set_offline(True)
        first.kill()
    reads_of_chain = rf"GET /api/chains/{chain_id}"
    assert watched.count(reads_of_chain) == 1

    def ready_children(count: int) -> None:
        expect(children(page, root_id).and_(page.locator("[data-status=ready]"))).to_have_count(
            count, timeout=30_000
        )

    # Replayed: the missed events are still in the log.
    with server_process(data, port, log=tmp_path / "server.log", **MOCK):
        made = api.post(f"/api/nodes/{root_id}/branch", json={"prompt": "a", "duration_s": 1})
        assert made.status_code == 202
        wait_ready(api, made.json()["nodes"][0]["id"])
        context.set_offline(False)
        ready_children(1)
        expect(page.locator("#live")).to_have_text("● live", timeout=10_000)
        assert watched.count(reads_of_chain) == 1  # applied from the events alone
        context.set_offline(True)

    # Reset: this server keeps one event per chain, so what was missed is gone.
    with server_process(
        data, port, log=tmp_path / "server.log", SPARROW_EVENT_RETENTION="1", **MOCK
    ):
        made = api.post(f"/api/nodes/{root_id}/branch", json={"prompt": "b", "duration_s": 1})
        wait_ready(api, made.json()["nodes"][0]["id"])
        context.set_offline(False)
        ready_children(2)
        assert watched.count(reads_of_chain) == 2  # the reset reloaded the chain

    # While the server was away, only the event stream's reconnects and the reads they
    # set off failed; the page itself raised nothing.
    assert watched.elsewhere == []
    assert all("Failed to load resource" in line for line in watched.console), watched.console
    events = re.compile(
        rf"^{re.escape(base)}/api/(chains/{chain_id}/events|nodes/\w+|chains/{chain_id}/spine.*)"
    )
    assert all(events.match(line.split(" ", 1)[1]) for line in watched.failed), watched.failed


def wait_ready(api: httpx.Client, node_id: str) -> None:
    wait_until(
        lambda: api.get(f"/api/nodes/{node_id}").json()["status"] == "ready",
        timeout_s=30,
        what=f"{node_id} to be ready",
    )


def test_with_auth_on_the_page_asks_for_a_key_and_keeps_it(
    browser: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    paid, free = (
        sparrow_cli(data, "keys", "create", "--tier", tier).stdout.strip().splitlines()[-1]
        for tier in ("paid", "free")
    )
    api = httpx.Client(base_url=base, timeout=10)
    request.addfinalizer(api.close)
    with server_process(data, port, log=tmp_path / "server.log", SPARROW_AUTH="on", **MOCK):
        page, watched = open_studio(browser, base, viewport=LAPTOP)
        key = page.get_by_test_id("api-key")
        expect(key).to_be_visible()
        assert key.get_attribute("type") == "password"
        expect(page.locator("#app")).to_be_hidden()

        # A wrong key: the API's sentence, next to the field.
        refused = api.get("/api/chains", headers={"Authorization": "Bearer nope"})
        key.fill("nope")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#key-form .error")).to_have_text(refused.json()["detail"])

        # The paid key: the whole app, events through a stream token, stems.
        key.fill(paid)
        page.get_by_role("button", name="Use key").click()
        upload(page, SAMPLE)
        chain_id = open_chain_id(page)
        root_id = page.get_by_test_id("node").first.get_attribute("data-node-id") or ""
        branch(page, "with a key", duration="2")
        expect(children(page, root_id)).to_have_attribute("data-status", "ready", timeout=30_000)
        stream = rf"GET /api/chains/{chain_id}/events\?last_event_id=\d+&token=[\w.-]+"
        assert watched.count(stream) >= 1, [r for r in watched.requests if "events" in r]
        assert watched.count(rf"GET /api/chains/{chain_id}/events.*") == watched.count(stream)
        own(node(page, root_id), "stems").click()
        stem_players = node(page, root_id).locator("[data-testid=stem] audio")
        expect(stem_players).to_have_count(4, timeout=30_000)
        for i in range(4):  # each one's audio fetched (with the key) before the reload below
            expect(stem_players.nth(i)).to_have_attribute("src", re.compile("^blob:"))

        # Kept in the browser: a reload goes straight back to the chain.
        page.reload()
        expect(page.get_by_test_id("node")).to_have_count(2)
        expect(page.get_by_role("button", name="Forget key")).to_be_visible()
        assert watched.failed_loads() == [refused.status_code]
        assert watched.failed == [] and watched.elsewhere == []

        # A free key sees its own chains only, and stems are refused with the API's words.
        page, watched = open_studio(browser, base, viewport=LAPTOP)
        page.get_by_test_id("api-key").fill(free)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#chains-empty")).to_be_visible()  # its own chains: none yet
        expect(page.get_by_test_id("chain-item")).to_have_count(0)
        upload(page, SAMPLE)
        free_root = page.get_by_test_id("node").first
        headers = {"Authorization": f"Bearer {free}"}
        chain = api.get(f"/api/chains/{open_chain_id(page)}", headers=headers).json()
        refused = api.post(f"/api/nodes/{chain['chain']['root_node_id']}/stems", headers=headers)
        assert refused.status_code == 402
        own(free_root, "stems").click()
        expect(free_root.locator(":scope > .card > .error")).to_have_text(refused.json()["detail"])


def test_a_narrow_window_keyboard_and_labels(browser: Browser, served: str) -> None:
    page, watched = open_studio(browser, served, viewport={"width": 390, "height": 844})
    upload(page, SAMPLE)
    branch(page, "small screen", duration="1")
    expect(page.locator("[data-testid=node][data-status=ready]")).to_have_count(2, timeout=30_000)

    # Nothing is wider than the window.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390

    # Every control has a name a screen reader can say.
    snapshot = page.locator("body").aria_snapshot()
    control = r"(button|textbox|spinbutton|combobox|checkbox|radio|slider)"
    nameless = re.compile(rf"^\s*- {control}(:|$| \[)")
    unnamed = [line for line in snapshot.splitlines() if nameless.match(line)]
    assert unnamed == [], snapshot

    # The branch form is reachable from the keyboard, and submits with it.
    page.get_by_test_id("branch-prompt").focus()
    for _ in range(12):
        if page.evaluate("() => document.activeElement.dataset.testid") == "branch-submit":
            break
        page.keyboard.press("Tab")
    else:
        raise AssertionError("Tab never reached the branch button")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("node")).to_have_count(3)
    watched.assert_clean()
