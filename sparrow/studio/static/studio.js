// Sparrow Studio: the editor page. Plain ES modules over Sparrow's API (SPEC §13):
// the server's JSON and events are the state; the page only draws them.

import { Api } from "./api.js";
import { ChainStream } from "./stream.js";
import { Waveform, formatTime } from "./wave.js";

const api = new Api();
const $ = (selector, root = document) => root.querySelector(selector);

// Build an element: el("button", {type: "button", onclick}, "Commit").
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// The sentence the API sent goes next to what caused it; nothing ends as a console error.
function showError(where, error) {
  const box = where.matches(".error") ? where : $(".error", where);
  box.textContent = error ? error.message : "";
}

function guarded(where, action) {
  return async (...args) => {
    showError(where, null);
    try {
      await action(...args);
    } catch (error) {
      showError(where, error);
    }
  };
}

const fmt = {
  seconds: (s) => `${Number(s).toFixed(s < 10 ? 2 : 1)} s`,
  short: (id) => id.slice(0, 8),
  eta: (s) => (s >= 60 ? `${Math.round(s / 60)} min` : `${Math.max(1, Math.round(s))} s`),
};

// ---------------------------------------------------------------------------------------
// The key (auth on) and the engine line.

const keyForm = $("#key-form");

// The server writes into the page whether auth is on (SPEC §8).
const authOn = document.documentElement.dataset.auth === "on";

async function start() {
  keyForm.hidden = !authOn;
  if (authOn && !api.key) return askForKey(null);
  await enter();
}

function askForKey(error) {
  $("#app").hidden = true;
  $("#key-forget").hidden = !api.key;
  showError(keyForm, error);
  $("#api-key").focus();
}

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  api.setKey($("#api-key").value.trim());
  await enter();
});

$("#key-forget").addEventListener("click", () => {
  api.setKey("");
  $("#api-key").value = "";
  closeChain();
  askForKey(null);
});

async function enter() {
  try {
    await refreshChains();
  } catch (error) {
    if (error.status === 401) return askForKey(error);
    showError($("#chains-error"), error);
  }
  if (api.key) {
    $("#api-key").value = api.key;
    $("#key-forget").hidden = false;
  }
  $("#app").hidden = false;
  api.gpu().then(
    (gpu) => {
      const g = gpu.generation;
      $("#engine").textContent = `${g.engine} · ${g.model} · ${g.device}`;
    },
    () => {},
  );
  const wanted = new URLSearchParams(location.hash.slice(1)).get("chain");
  if (wanted) {
    await openChain(wanted).catch((error) => {
      history.replaceState(null, "", location.pathname); // deleted, or another key's
      showError($("#chains-error"), error);
    });
  }
}

// Chains made elsewhere (another tab, a script) appear when the page is back in focus.
window.addEventListener("focus", () => {
  if (!$("#app").hidden) refreshChains().catch((error) => showError($("#chains-error"), error));
});

// ---------------------------------------------------------------------------------------
// Upload: the file picker and drag and drop.

const uploadForm = $("#upload-form");

async function uploadFile(file) {
  const bar = $("#upload-progress");
  bar.hidden = false;
  bar.value = 0;
  try {
    const title = $("#upload-title").value.trim() || file.name.replace(/\.[^.]+$/, "");
    const created = await api.upload(file, title, (done) => (bar.value = done));
    $("#upload-title").value = "";
    await refreshChains();
    await openChain(created.chain.id);
  } finally {
    bar.hidden = true;
    $("#upload-input").value = "";
  }
}

$("#upload-input").addEventListener(
  "change",
  guarded(uploadForm, async (event) => {
    const [file] = event.target.files;
    if (file) await uploadFile(file);
  }),
);
uploadForm.addEventListener("submit", (event) => event.preventDefault());
for (const type of ["dragenter", "dragover"]) {
  uploadForm.addEventListener(type, (event) => {
    event.preventDefault();
    uploadForm.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  uploadForm.addEventListener(type, () => uploadForm.classList.remove("dragging"));
}
uploadForm.addEventListener(
  "drop",
  guarded(uploadForm, async (event) => {
    event.preventDefault();
    const [file] = event.dataTransfer.files;
    if (file) await uploadFile(file);
  }),
);

// ---------------------------------------------------------------------------------------
// The chain list.

async function refreshChains() {
  const { items } = await api.chains();
  const list = $("#chain-list");
  list.replaceChildren(
    ...items.map((chain) =>
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            class: "chain-item",
            "data-testid": "chain-item",
            "data-chain-id": chain.id,
            "aria-current": current?.id === chain.id ? "true" : null,
            onclick: guarded($("#chains-error"), () => openChain(chain.id)),
          },
          el("span", { class: "chain-name" }, chain.title),
          el("time", { datetime: chain.created_at }, new Date(chain.created_at).toLocaleString()),
        ),
      ),
    ),
  );
  $("#chains-empty").hidden = items.length > 0;
}

// ---------------------------------------------------------------------------------------
// One open chain: its tree, spine, branch form and event stream.

// The open chain: { id, chain, nodes: Map(id -> NodeView), stream, parent and fromS (the
// branch form's choice), spineKey and spineWave (the spine as last drawn) }.
let current = null;

function closeChain() {
  if (!current) return;
  current.stream.close();
  for (const view of current.nodes.values()) view.destroy();
  current.spineWave?.destroy();
  current = null;
  $("#tree").replaceChildren();
  $("#chain").hidden = true;
  $("#welcome").hidden = false;
}

async function openChain(chainId) {
  const detail = await api.chain(chainId);
  closeChain();
  current = { id: chainId, chain: detail.chain, nodes: new Map(), parent: null, fromS: null };
  history.replaceState(null, "", `#chain=${chainId}`);
  $("#chain").hidden = false;
  $("#welcome").hidden = true;
  $("#chain-title").value = detail.chain.title;
  for (const button of document.querySelectorAll(".chain-item")) {
    button.setAttribute("aria-current", String(button.dataset.chainId === chainId));
  }
  drawNodes(detail.nodes);
  chooseRoot();
  // Events are applied one after another, in id order; one that cannot be applied (its
  // node could not be read, say) is made good by reloading the whole chain.
  const session = current;
  let applied = Promise.resolve();
  const stream = new ChainStream(api, chainId, detail.chain.last_event_id, {
    onEvent: (type, data) => {
      applied = applied.then(() => onEvent(type, data)).catch(() => resync(session));
    },
    onState: (state) => {
      const live = $("#live");
      live.textContent = state === "live" ? "● live" : "reconnecting…";
      live.dataset.state = state;
    },
  });
  current.stream = stream;
  $("#live").textContent = "connecting…";
  await Promise.all([stream.open(), refreshSpine()]);
}

function drawNodes(nodes) {
  const ordered = [...nodes].sort((a, b) => a.created_at.localeCompare(b.created_at));
  for (const node of ordered) upsertNode(node);
}

function chooseRoot() {
  const root = current.nodes.get(current.chain.root_node_id);
  if (root) choose(root.node, null);
}

function upsertNode(node) {
  const view = current.nodes.get(node.id);
  if (view) return view.update(node);
  const created = new NodeView(node);
  current.nodes.set(node.id, created);
  const parent = node.parent_id && current.nodes.get(node.parent_id);
  (parent ? parent.children : $("#tree")).append(created.element);
  return created;
}

function removeNode(nodeId) {
  const view = current.nodes.get(nodeId);
  if (!view) return;
  view.destroy();
  current.nodes.delete(nodeId);
  if (current.parent === nodeId) chooseRoot();
}

async function reloadNode(nodeId) {
  const node = await api.node(nodeId);
  if (current?.id === node.chain_id) upsertNode(node); // still the chain on screen
}

// Close the chain (deleted here or elsewhere) and go back to the list.
async function leaveChain() {
  closeChain();
  history.replaceState(null, "", location.pathname);
  await refreshChains();
}

async function onEvent(type, data) {
  if (!current || data.chain_id !== current.id) return;
  const view = current.nodes.get(data.node_id);
  switch (type) {
    case "node-status":
      if (view && data.status !== "ready") view.update({ ...view.node, status: data.status, error: data.error ?? null });
      else await reloadNode(data.node_id); // ready: its duration and audio are new
      break;
    case "node-progress":
      view?.progress(data.progress, data.eta_s);
      break;
    case "node-analysis":
      if (view) view.update({ ...view.node, analysis: data.analysis });
      break;
    case "node-deleted":
      for (const id of data.node_ids) removeNode(id);
      break;
    case "spine-changed":
      for (const id of data.node_ids) {
        const changed = current.nodes.get(id);
        if (changed) changed.update({ ...changed.node, committed: data.committed.includes(id) });
      }
      await refreshSpine();
      break;
    case "stems-status":
    case "stems-progress":
      await view?.stemsChanged(type, data);
      break;
    case "chain-deleted":
      await leaveChain();
      break;
    case "reset": // the log no longer holds what was missed
      await reloadChain();
      break;
  }
}

// Bring the open chain up to date from the API, as on a `reset`.
async function reloadChain() {
  const detail = await api.chain(current.id);
  const known = new Set(detail.nodes.map((n) => n.id));
  for (const id of [...current.nodes.keys()]) if (!known.has(id)) removeNode(id);
  drawNodes(detail.nodes);
  await refreshSpine();
}

function resync(session) {
  if (current !== session) return;
  reloadChain().then(
    () => showError($(".chain-head"), null),
    (error) => {
      if (error.status === 404) return onEvent("chain-deleted", { chain_id: session.id });
      showError($(".chain-head"), error);
      setTimeout(() => resync(session), 2000);
    },
  );
}

// ---------------------------------------------------------------------------------------
// A node of the tree.

// Cards draw their waveform (one peaks request each) once they come near the screen.
const onScreen = new IntersectionObserver(
  (entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      onScreen.unobserve(entry.target);
      entry.target.closest(".node")?.view?.drawWave();
    }
  },
  { rootMargin: "400px 0px" },
);

class NodeView {
  constructor(node) {
    this.node = node;
    this.wave = null;
    this.stemPlayers = null;
    const label = node.parent_id === null ? "the upload" : `node ${fmt.short(node.id)}`;
    this.label = label;

    this.status = el("span", { class: "badge" });
    this.title = el("strong", { class: "node-title" });
    this.meta = el("span", { class: "muted meta" });
    this.bar = el("progress", { max: "1", "aria-label": `Progress of ${label}` });
    this.eta = el("span", { class: "muted eta" });
    this.progressRow = el("div", { class: "progress-row" }, this.bar, this.eta);
    this.waveSlot = el("div", { class: "wave-slot" });
    this.analysis = el("p", { class: "analysis muted" });
    this.problem = el("p", { class: "node-error" });
    // A button of this card; its accessible name says which node it acts on.
    const act = (name, text, action) =>
      el(
        "button",
        {
          type: "button",
          class: name,
          "data-testid": name,
          "aria-label": `${text} (${label})`,
          onclick: guarded(this.errorBox, action),
        },
        text,
      );
    this.errorBox = el("p", { class: "error", role: "alert" });
    this.buttons = {
      branch: act("branch-from", "Branch from here", () => choose(this.node, null)),
      commit: act("commit", "Commit", () => api.act(this.node.id, "commit")),
      uncommit: act("uncommit", "Uncommit", () => api.act(this.node.id, "uncommit")),
      discard: act("discard", "Discard", () => api.act(this.node.id, "discard")),
      cancel: act("cancel", "Cancel", () => api.act(this.node.id, "cancel")),
      stems: act("stems", "Stems", () => this.separate()),
    };
    this.stems = el("div", { class: "stems", hidden: true });
    this.children = el("ol", { class: "children" });
    this.card = el(
      "article",
      { class: "card", "aria-label": label },
      el("div", { class: "card-head" }, this.status, this.title, this.meta),
      this.progressRow,
      this.problem,
      this.waveSlot,
      this.analysis,
      el("div", { class: "actions" }, ...Object.values(this.buttons)),
      this.errorBox,
      this.stems,
    );
    this.element = el(
      "li",
      { class: "node", "data-testid": "node", "data-node-id": node.id },
      this.card,
      this.children,
    );
    this.element.view = this;
    this.update(node);
  }

  update(node) {
    this.node = node;
    const root = node.parent_id === null;
    const { status } = node;
    Object.assign(this.element.dataset, { status, committed: String(node.committed) });
    this.status.textContent = status;
    this.status.dataset.status = status;
    this.title.textContent = root ? "Upload" : node.prompt || "(no prompt)";
    const bits = [];
    if (node.duration_s) bits.push(fmt.seconds(node.duration_s));
    if (node.from_s !== null && node.from_s !== undefined) bits.push(`from ${fmt.seconds(node.from_s)} of its parent`);
    if (node.params?.seed !== undefined) bits.push(`seed ${node.params.seed}`);
    if (node.committed) bits.push("on the spine");
    this.meta.textContent = bits.join(" · ");
    const running = status === "queued" || status === "generating";
    this.progressRow.hidden = !running;
    if (status === "queued") {
      this.bar.removeAttribute("value");
      this.eta.textContent = "waiting for the engine";
    }
    this.problem.textContent = node.error ? `${node.error.detail}` : "";
    this.problem.hidden = !node.error;
    const a = node.analysis;
    this.analysis.textContent = a
      ? [
          a.tempo_bpm ? `${a.tempo_bpm.toFixed(1)} BPM` : "tempo unclear",
          a.key ?? "key unclear",
          a.loudness_lufs !== null ? `${a.loudness_lufs.toFixed(1)} LUFS` : "silent",
          a.true_peak_dbtp !== null ? `peak ${a.true_peak_dbtp.toFixed(1)} dBTP` : null,
        ]
          .filter(Boolean)
          .join(" · ")
      : status === "ready"
        ? "analysing…"
        : "";
    const ready = status === "ready";
    this.buttons.branch.hidden = !ready;
    this.buttons.commit.hidden = !ready || node.committed;
    this.buttons.uncommit.hidden = !node.committed || root;
    this.buttons.discard.hidden = root || node.committed || running;
    this.buttons.cancel.hidden = !running;
    this.buttons.stems.hidden = !ready;
    const pending = this.waveSlot.classList.contains("pending");
    if (ready && !this.wave && !pending) {
      // Drawn when it scrolls into view: a long chain costs what is seen.
      this.waveSlot.classList.add("pending");
      onScreen.observe(this.waveSlot);
    }
    if (current?.parent === node.id) describeParent();
  }

  progress(fraction, etaS) {
    if (this.node.status === "queued") this.update({ ...this.node, status: "generating" });
    this.bar.value = fraction;
    const percent = `${Math.round(fraction * 100)} %`;
    this.eta.textContent = etaS !== undefined && etaS !== null ? `${percent} · about ${fmt.eta(etaS)} left` : percent;
  }

  drawWave() {
    if (this.wave) return;
    this.waveSlot.classList.remove("pending");
    const { id, duration_s: duration } = this.node;
    this.wave = new Waveform(api, this.waveSlot, {
      peaksPath: `/api/nodes/${id}/peaks`,
      audioPath: `/api/nodes/${id}/audio`,
      duration,
      label: this.label,
      onPick: (seconds) => choose(this.node, seconds),
      onError: (error) => showError(this.errorBox, error),
    });
  }

  async separate() {
    await api.separate(this.node.id);
    await this.showStems(await api.stems(this.node.id));
  }

  async stemsChanged(type, data) {
    if (type === "stems-progress") {
      this.stems.hidden = false;
      this.stemsLine().textContent = `separating · ${Math.round(data.progress * 100)} %`;
      return;
    }
    await this.showStems(await api.stems(this.node.id));
  }

  stemsLine() {
    let line = $(".stems-status", this.stems);
    if (!line) {
      line = el("p", { class: "stems-status muted" });
      this.stems.prepend(line);
    }
    return line;
  }

  async showStems(stems) {
    this.stems.hidden = false;
    const line = this.stemsLine();
    line.textContent = stems.error ? `stems: ${stems.error.detail}` : `stems: ${stems.status}`;
    if (stems.status !== "ready" || this.stemPlayers) return;
    this.stemPlayers = el("ul", { class: "stem-players" });
    this.stems.append(this.stemPlayers);
    for (const [name, url] of Object.entries(stems.urls)) {
      const player = el("audio", { controls: true, preload: "none", "aria-label": `${name} of ${this.label}` });
      this.stemPlayers.append(el("li", { "data-testid": "stem", "data-stem": name }, el("span", {}, name), player));
      player.src = URL.createObjectURL(await api.blob(url));
    }
  }

  destroy() {
    onScreen.unobserve(this.waveSlot);
    this.wave?.destroy();
    for (const audio of this.stems.querySelectorAll("audio")) URL.revokeObjectURL(audio.src);
    this.element.remove();
  }
}

// ---------------------------------------------------------------------------------------
// The branch form: its parent and point come from the tree.

const branchForm = $("#branch-form");

function choose(node, seconds) {
  current.parent = node.id;
  current.fromS = seconds === null ? null : Math.max(0.01, Math.round(seconds * 100) / 100);
  branchForm.elements.from_s.value = current.fromS ?? "";
  if (node.duration_s) branchForm.elements.from_s.max = node.duration_s;
  for (const view of current.nodes.values()) view.element.classList.toggle("chosen", view.node.id === node.id);
  describeParent();
}

function describeParent() {
  const view = current?.nodes.get(current.parent);
  if (!view) return;
  const where = current.fromS === null ? "its end" : formatTime(current.fromS);
  $("#branch-parent").textContent = `Continues ${view.node.parent_id === null ? "the upload" : `“${view.node.prompt || fmt.short(view.node.id)}”`} from ${where}.`;
}

branchForm.elements.from_s.addEventListener("input", (event) => {
  current.fromS = event.target.value === "" ? null : Number(event.target.value);
  describeParent();
});

function promptMode() {
  return branchForm.elements.mode.value;
}

function linesOfPrompt() {
  return branchForm.elements.prompt.value.split("\n").map((l) => l.trim()).filter(Boolean);
}

function syncPromptMode() {
  const each = promptMode() === "each";
  $("#prompt-label").textContent = each ? "Prompts, one per line (one sibling each)" : "Prompt";
  branchForm.elements.count.readOnly = each;
  if (each) branchForm.elements.count.value = Math.max(1, linesOfPrompt().length);
}

for (const radio of branchForm.elements.mode) radio.addEventListener("change", syncPromptMode);
branchForm.elements.prompt.addEventListener("input", () => promptMode() === "each" && syncPromptMode());

branchForm.addEventListener(
  "submit",
  guarded(branchForm, async (event) => {
    event.preventDefault();
    const f = branchForm.elements;
    const body = {
      duration_s: Number(f.duration_s.value),
      count: Number(f.count.value),
      context_s: Number(f.context_s.value),
    };
    if (promptMode() === "each") body.prompts = linesOfPrompt();
    else body.prompt = f.prompt.value.trim();
    if (f.from_s.value !== "") body.from_s = Number(f.from_s.value);
    if (f.seed.value !== "") body.seed = Number(f.seed.value);
    f.prompt.disabled = true;
    try {
      const { nodes } = await api.branch(current.parent, body);
      for (const node of nodes) upsertNode(node);
    } finally {
      f.prompt.disabled = false;
    }
  }),
);

// ---------------------------------------------------------------------------------------
// The spine: its waveform, playback and export.

async function refreshSpine() {
  const chainId = current.id;
  const spine = await api.spine(chainId);
  if (current?.id !== chainId) return;
  const panel = $("#spine");
  panel.dataset.durationS = String(spine.duration_s);
  const count = spine.nodes.length;
  $("#spine-summary").textContent = `· ${count} node${count === 1 ? "" : "s"} · ${formatTime(spine.duration_s)}`;
  const key = spine.nodes.map((e) => `${e.node.id}:${e.play_s}`).join(",");
  if (key === current.spineKey) return;
  current.spineKey = key;
  current.spineWave?.destroy();
  current.spineWave = new Waveform(api, $("#spine-wave"), {
    peaksPath: `/api/chains/${chainId}/spine/peaks`,
    audioPath: `/api/chains/${chainId}/spine/audio`,
    duration: spine.duration_s,
    label: "the spine",
    color: "#9b8ac4",
    onError: (error) => showError($("#export-form"), error),
  });
}

const exportForm = $("#export-form");
exportForm.addEventListener(
  "submit",
  guarded(exportForm, async (event) => {
    event.preventDefault();
    const f = exportForm.elements;
    const body = { format: f.format.value, crossfade_ms: Number(f.crossfade_ms.value || 0) };
    if (f.loudness_lufs.value !== "") body.loudness_lufs = Number(f.loudness_lufs.value);
    const button = $("[data-testid=export-submit]", exportForm);
    button.disabled = true;
    button.textContent = "Exporting…";
    try {
      const { blob, filename } = await api.exportSpine(current.id, body);
      const url = URL.createObjectURL(blob);
      const link = el("a", { href: url, download: filename, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } finally {
      button.disabled = false;
      button.textContent = "Export";
    }
  }),
);

// ---------------------------------------------------------------------------------------
// The chain's own controls.

const chainHead = $(".chain-head");
$("#rename-form").addEventListener(
  "submit",
  guarded(chainHead, async (event) => {
    event.preventDefault();
    const chain = await api.rename(current.id, $("#chain-title").value.trim());
    current.chain = chain;
    await refreshChains();
  }),
);
$("#delete-chain").addEventListener(
  "click",
  guarded(chainHead, async () => {
    if (!confirm(`Delete “${current.chain.title}” and everything in it?`)) return;
    await api.deleteChain(current.id);
    await leaveChain();
  }),
);

// Leaving the page closes its event stream, rather than having the browser cut it.
window.addEventListener("pagehide", () => current?.stream.close());

start();
