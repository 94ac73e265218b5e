// One waveform with its player: wavesurfer.js draws Sparrow's peaks (the browser never
// decodes a whole file to draw it), and the audio is fetched only when it is first
// played, with the API key when there is one, and handed to wavesurfer as a blob.

import WaveSurfer from "./vendor/wavesurfer.esm.js";

// Peaks of one merged channel: audiowaveform's 8-bit [min, max] pairs, as -1..1 floats.
function channelOf(peaks) {
  return Float32Array.from(peaks.data, (v) => v / 128);
}

function pixelsPerSecond(width, duration) {
  const pixels = Math.max(64, Math.round(width * (window.devicePixelRatio || 1)));
  return Math.max(1, Math.min(400, Math.ceil(pixels / Math.max(duration, 0.01))));
}

export function formatTime(seconds) {
  const m = Math.floor(seconds / 60);
  const s = seconds - m * 60;
  return `${m}:${s.toFixed(2).padStart(5, "0")}`;
}

export class Waveform {
  // peaksPath and audioPath are API paths; onPick(seconds) is called on a click.
  // onError(error) hears what went wrong drawing or playing.
  constructor(api, container, { peaksPath, audioPath, duration, label, onPick, onError, color }) {
    this.api = api;
    this.onError = onError;
    this.audioPath = audioPath;
    this.duration = duration;
    this.loaded = false; // the audio, fetched at the first play
    this.onPick = onPick;

    this.element = document.createElement("div");
    this.element.className = "waveform";
    const controls = document.createElement("div");
    controls.className = "wave-controls";
    this.button = document.createElement("button");
    this.button.type = "button";
    this.button.className = "play";
    this.button.textContent = "Play";
    this.button.setAttribute("aria-label", `Play ${label}`);
    this.button.addEventListener("click", () => this.toggle().catch((e) => this.onError?.(e)));
    this.clock = document.createElement("span");
    this.clock.className = "clock";
    this.showTime(0);
    controls.append(this.button, this.clock);
    this.surface = document.createElement("div");
    this.surface.className = "surface";
    this.surface.setAttribute("role", "img");
    this.surface.setAttribute("aria-label", `Waveform of ${label}`);
    this.element.append(controls, this.surface);
    container.replaceChildren(this.element);

    this.ready = this.draw(peaksPath, color);
    this.ready.catch((e) => this.onError?.(e));
  }

  async draw(peaksPath, color) {
    const width = this.surface.clientWidth || 600;
    const peaks = await this.api.get(
      `${peaksPath}?pixels_per_second=${pixelsPerSecond(width, this.duration)}`,
    );
    this.peaks = [channelOf(peaks)];
    this.surfer = WaveSurfer.create({
      container: this.surface,
      height: 64,
      waveColor: color || "#7c8aa5",
      progressColor: "#e0803c",
      cursorColor: "#f2f2f2",
      barWidth: 2,
      barGap: 1,
      barRadius: 1,
      normalize: true,
      peaks: this.peaks,
      duration: this.duration,
    });
    this.surfer.on("interaction", (seconds) => this.onPick?.(seconds));
    this.surfer.on("timeupdate", (t) => this.showTime(t));
    this.surfer.on("play", () => (this.button.textContent = "Pause"));
    this.surfer.on("pause", () => (this.button.textContent = "Play"));
    this.surfer.on("finish", () => (this.button.textContent = "Play"));
  }

  showTime(seconds) {
    this.clock.textContent = `${formatTime(seconds)} / ${formatTime(this.duration)}`;
  }

  async toggle() {
    await this.ready;
    if (this.surfer.isPlaying()) return this.surfer.pause();
    if (!this.loaded) {
      this.button.disabled = true;
      this.button.textContent = "Loading…";
      try {
        const at = this.surfer.getCurrentTime();
        await this.surfer.loadBlob(await this.api.blob(this.audioPath), this.peaks, this.duration);
        this.surfer.setTime(at);
        this.loaded = true;
      } finally {
        this.button.disabled = false;
        this.button.textContent = "Play";
      }
    }
    await this.surfer.play();
  }

  destroy() {
    this.surfer?.destroy();
    this.element.remove();
  }
}
