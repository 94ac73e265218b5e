// A chain's event stream (SPEC §4) that stays open: the browser's EventSource reconnects
// by itself with Last-Event-ID; when the server refuses a reconnect (an expired stream
// token, a restart), a new stream opens from the last event seen, with a fresh token.

export const EVENT_TYPES = [
  "node-status",
  "node-progress",
  "node-analysis",
  "node-deleted",
  "spine-changed",
  "stems-status",
  "stems-progress",
  "chain-deleted",
  "reset",
];

const REOPEN_MS = [500, 1000, 2000, 5000];

export class ChainStream {
  // onEvent(type, data) for each event in id order; onState("live" | "reconnecting").
  constructor(api, chainId, lastEventId, { onEvent, onState }) {
    this.api = api;
    this.chainId = chainId;
    this.last = lastEventId;
    this.onEvent = onEvent;
    this.onState = onState;
    this.source = null;
    this.closed = false;
    this.failures = 0;
    this.timer = null;
  }

  async open() {
    if (this.closed) return;
    const query = new URLSearchParams({ last_event_id: String(this.last) });
    if (this.api.key) {
      try {
        const { token } = await this.api.streamToken(this.chainId);
        if (token) query.set("token", token);
      } catch (error) {
        if (error.status === 404) return this.onEvent("chain-deleted", { chain_id: this.chainId });
        return this.reopenLater();
      }
    }
    if (this.closed) return;
    const source = new EventSource(`/api/chains/${this.chainId}/events?${query}`);
    this.source = source;
    source.onopen = () => {
      this.failures = 0;
      this.onState("live");
    };
    source.onerror = () => {
      this.onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) this.reopenLater();
    };
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (message) => this.deliver(type, message));
    }
  }

  deliver(type, message) {
    const id = Number(message.lastEventId);
    if (Number.isFinite(id) && id > 0) {
      if (id <= this.last) return; // already seen (a replay that overlaps what we hold)
      this.last = id;
    }
    this.onEvent(type, JSON.parse(message.data));
  }

  reopenLater() {
    this.source?.close();
    this.source = null;
    const wait = REOPEN_MS[Math.min(this.failures, REOPEN_MS.length - 1)];
    this.failures += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), wait);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.source?.close();
  }
}
