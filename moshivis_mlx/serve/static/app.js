// The conversation page: wires the picture, the microphone, the socket and the transcript.
// Page parameters: `?audio=pcm` forces the PCM audio path; every other parameter of the
// page's address (an access token, sampling settings) is passed on to /api/chat.

import { Microphone, Player, openAudio } from "./audio.js";
import { OpusReceiver, OpusSender, PcmReceiver, PcmSender, webCodecsOpus } from "./codec.js";
import { GateScale, cssRgb, gateOfColor, gateRgb } from "./gate.js";
import { Camera, pictureFromFile } from "./picture.js";
import { decodeMessage, encodeControl, encodeImage, encodePing } from "./protocol.js";

const HANDSHAKE_TIMEOUT_S = 30; // the server reads the picture before its handshake
const SILENCE_TIMEOUT_S = 10; // as Kyutai's client: a live server speaks every 80 ms
const MAX_WORDS = 3000;
const PING_EVERY_S = 2;
const PAGE_ONLY = new Set(["audio"]);

const $ = (id) => document.getElementById(id);
const ui = {
  // header and notices
  state: $("state"), path: $("path"), model: $("model"), notice: $("notice"),
  // the picture
  file: $("file"), camera: $("camera"), snap: $("snap"), drop: $("drop"),
  preview: $("preview"), video: $("video"), pictureName: $("picture-name"),
  // the conversation
  start: $("start"), mute: $("mute"), restart: $("restart"), settings: $("settings"),
  transcript: $("transcript"), legend: $("legend"),
  legendLo: $("legend-lo"), legendHi: $("legend-hi"),
  // the status line
  lag: $("lag"), step: $("step"), rtt: $("rtt"), buffer: $("buffer"),
  underruns: $("underruns"), level: $("level"),
};

const page = new URLSearchParams(location.search);
const forcePcm = page.get("audio") === "pcm";

const app = {
  context: null, mic: null, player: null, camera: null,
  picture: null, // {bytes, blob, name}
  conversation: null, // one socket's life: see connect()
  scale: new GateScale(),
  bounds: [0, 1],
  words: 0,
  stats: { connections: 0, handshakes: 0, messages: {}, sentFrames: 0, errors: [], metadata: [] },
};

// -- state and notices ----------------------------------------------------------------------

/** The connection's state: `kind` is idle, connecting, live, closed or error. */
function setState(text, kind) {
  ui.state.textContent = text;
  ui.state.dataset.kind = kind;
  ui.mute.disabled = kind !== "live";
  ui.restart.disabled = !["live", "closed", "error"].includes(kind);
  ui.start.textContent = stopped() ? "Start" : "Stop";
}

const stopped = () => ["idle", "closed", "error"].includes(ui.state.dataset.kind);

function notify(text, kind = "error") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = !text;
  if (kind === "error" && text) app.stats.errors.push(text);
}

function checkSecureContext() {
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    notify("The microphone needs a secure page: open the https:// address the server printed " +
      "(or http://localhost on the machine itself).", "warning");
    return false;
  }
  return true;
}

// -- the picture ----------------------------------------------------------------------------

async function usePicture(picture) {
  app.picture = picture;
  if (ui.preview.src) URL.revokeObjectURL(ui.preview.src);
  ui.preview.src = URL.createObjectURL(picture.blob);
  ui.preview.hidden = false;
  ui.drop.classList.add("has-picture");
  ui.pictureName.textContent = picture.name;
  const c = app.conversation;
  if (c && c.socket.readyState === WebSocket.OPEN && c.handshake) {
    c.socket.send(encodeImage(picture.bytes)); // switches the picture mid-conversation
    marker("new picture");
  }
}

async function useFile(file) {
  try {
    await usePicture(await pictureFromFile(file));
  } catch (e) {
    notify(`The picture could not be read: ${e.message}`);
  }
}

ui.file.addEventListener("change", () => {
  if (ui.file.files.length) useFile(ui.file.files[0]);
});

// A picture dropped anywhere on the page.
document.addEventListener("dragover", (e) => {
  e.preventDefault();
  ui.drop.classList.add("dragging");
});
document.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) ui.drop.classList.remove("dragging"); // left the window
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.drop.classList.remove("dragging");
  const file = [...(e.dataTransfer?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file) useFile(file);
});

ui.camera.addEventListener("click", async () => {
  if (app.camera) {
    closeCamera();
    return;
  }
  try {
    app.camera = await Camera.open(ui.video);
    ui.video.hidden = false;
    ui.preview.hidden = true;
    ui.snap.hidden = false;
    ui.camera.textContent = "Close camera";
  } catch (e) {
    notify(`No camera: ${e.message}`);
  }
});

ui.snap.addEventListener("click", async () => {
  try {
    const picture = await app.camera.snapshot();
    closeCamera();
    await usePicture(picture);
  } catch (e) {
    notify(e.message);
  }
});

function closeCamera() {
  app.camera?.close();
  app.camera = null;
  ui.video.hidden = true;
  ui.snap.hidden = true;
  ui.preview.hidden = !app.picture;
  ui.camera.textContent = "Camera";
}

// -- the transcript -------------------------------------------------------------------------

function addWord(text, gate) {
  const span = document.createElement("span");
  span.textContent = text;
  if (gate !== null) {
    app.scale.add(gate);
    span.dataset.gate = gate;
  }
  ui.transcript.append(span);
  if (++app.words > MAX_WORDS) {
    ui.transcript.firstChild.remove();
    app.words--;
  }
  recolour(gate === null ? [span] : null);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function marker(text) {
  const span = document.createElement("span");
  span.className = "marker";
  span.textContent = ` [${text}] `;
  ui.transcript.append(span);
  app.words++;
}

/** Colours words by gate over the recent range; all of them when the range moved, as the
 * terminal repaints its transcript. */
function recolour(only) {
  const bounds = app.scale.bounds();
  const moved = bounds[0] !== app.bounds[0] || bounds[1] !== app.bounds[1];
  app.bounds = bounds;
  const spans = moved || !only ? ui.transcript.querySelectorAll("span[data-gate]") : only;
  for (const span of spans) {
    if (span.dataset.gate !== undefined) {
      span.style.color = cssRgb(app.scale.rgb(Number(span.dataset.gate)));
    }
  }
  ui.legendLo.textContent = bounds[0].toFixed(3);
  ui.legendHi.textContent = bounds[1].toFixed(3);
}

function drawLegend() {
  const stops = Array.from({ length: 8 },
    (_, i) => `${cssRgb(gateRgb(i / 7))} ${((i / 7) * 100).toFixed(0)}%`);
  ui.legend.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
}

// -- the conversation -----------------------------------------------------------------------

function chatUrl(pcm) {
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [key, value] of page) if (!PAGE_ONLY.has(key)) url.searchParams.set(key, value);
  for (const input of ui.settings.querySelectorAll("input[name]")) {
    if (input.type === "checkbox") {
      if (input.checked) url.searchParams.set(input.name, "true");
    } else if (input.value.trim() !== "") {
      url.searchParams.set(input.name, input.value.trim());
    }
  }
  if (pcm) url.searchParams.set("audio", "pcm");
  url.searchParams.set("stats", "1"); // our server: the model's step time about once a second
  return url.toString();
}

async function start() {
  notify("");
  if (!checkSecureContext()) return;
  setState("starting", "connecting");
  try {
    if (!app.context) {
      app.context = await openAudio();
      app.player = new Player(app.context);
    }
    await app.context.resume();
    if (!app.mic) app.mic = await Microphone.open(app.context, onMicFrame);
  } catch (e) {
    setState("no microphone", "error");
    notify(`The microphone or the page's audio could not start: ${e.message}`);
    return;
  }
  const opus = forcePcm ? null : await webCodecsOpus();
  connect(opus);
}

function connect(opusConfig) {
  const pcm = !opusConfig;
  ui.path.textContent = pcm ? "audio: PCM" : "audio: Opus (WebCodecs)";
  const socket = new WebSocket(chatUrl(pcm));
  socket.binaryType = "arraybuffer";
  const c = {
    socket, pcm, opusConfig, handshake: false, sender: null, receiver: null,
    opened: false, sent: 0, received: 0, stepMs: null, rttMs: null, pings: false,
    lastPing: 0, lastMessage: performance.now(),
  };
  app.conversation = c;
  app.stats.connections++;
  setState("connecting", "connecting");
  const fail = (text) => {
    notify(text);
    if (socket.readyState <= WebSocket.OPEN) socket.close();
  };
  const play = (samples, rate) => {
    c.received += samples.length / rate;
    app.player.play(samples, rate);
  };
  c.receiver = pcm ? new PcmReceiver(play) : new OpusReceiver(play, fail);

  socket.onopen = () => {
    c.opened = true;
    setState("waiting for the model", "connecting");
    if (app.picture) socket.send(encodeImage(app.picture.bytes)); // MoshiVis: the picture first
  };
  socket.onmessage = (event) => {
    if (app.conversation !== c) return;
    c.lastMessage = performance.now();
    const m = decodeMessage(event.data);
    app.stats.messages[m.kind] = (app.stats.messages[m.kind] ?? 0) + 1;
    switch (m.kind) {
      case "handshake":
        if (c.handshake) break;
        c.handshake = true;
        app.stats.handshakes++;
        c.sender = pcm ? new PcmSender(send) : new OpusSender(opusConfig, send, fail);
        setState("live", "live");
        break;
      case "audio":
        if (!pcm) c.receiver.receive(m.data);
        break;
      case "pcm":
        if (pcm) c.receiver.receive(m.samples);
        break;
      case "coloredtext":
        addWord(m.text, gateOfColor(m.color));
        break;
      case "text":
        addWord(m.text, null);
        break;
      case "error":
        notify(`The server says: ${m.text}`);
        break;
      case "metadata":
        onMetadata(c, m.data);
        break;
      case "ping":
        if (m.sent !== null) c.rttMs = performance.now() - m.sent;
        break;
      default: // control, and kinds this page does not know: nothing to do
        break;
    }
  };
  socket.onclose = (event) => {
    c.sender?.close();
    c.receiver?.close();
    c.sender = null;
    if (app.conversation !== c) return;
    // The conversation is over: the microphone is let go (the browser shows it unused).
    app.mic?.close();
    app.mic = null;
    if (!c.opened) {
      setState("could not connect", "error");
    } else {
      const clean = event.code === 1000 || event.code === 1005;
      setState(`closed${event.reason ? `: ${event.reason}` : clean ? "" : ` (${event.code})`}`,
        "closed");
    }
  };
  function send(message) {
    if (socket.readyState === WebSocket.OPEN) socket.send(message);
  }
}

/** Our server's metadata (other servers send none, or other keys: ignored). */
function onMetadata(c, data) {
  if (!data || typeof data !== "object") return;
  app.stats.metadata.push(data);
  if (app.stats.metadata.length > 50) app.stats.metadata.shift();
  if (data.type === "info") {
    if (data.model) ui.model.textContent = `model: ${data.model}`;
    c.pings = data.server === "moshivis-mlx"; // Kyutai's servers do not answer pings
  } else if (data.type === "stats" && typeof data.latency_ms === "number") {
    c.stepMs = data.latency_ms;
  } else if (data.type === "restarted") {
    app.player?.stop();
    marker("restarted");
  } else if (data.type === "message" && data.text) {
    notify(data.text, data.level === "error" ? "error" : "warning");
  }
}

function onMicFrame(frame) {
  const c = app.conversation;
  if (!c || !c.sender || c.socket.readyState !== WebSocket.OPEN) return;
  c.sender.send(frame);
  c.sent += frame.length / 24000;
  app.stats.sentFrames++;
}

function hangUp() {
  const c = app.conversation;
  app.conversation = null;
  if (c) {
    c.sender?.close();
    c.receiver?.close();
    c.socket.close();
  }
  app.player?.stop();
}

function stop() {
  hangUp();
  app.mic?.close();
  app.mic = null;
  setState("stopped", "idle");
}

/** Live: the server starts the conversation afresh on the same socket and picture (as
 * key r in the terminal). Closed: a new connection. */
function restart() {
  const c = app.conversation;
  if (c && c.handshake && c.socket.readyState === WebSocket.OPEN) {
    c.socket.send(encodeControl("restart"));
    return;
  }
  hangUp();
  marker("restart");
  start();
}

ui.start.addEventListener("click", () => (stopped() ? start() : stop()));
ui.restart.addEventListener("click", restart);
ui.mute.addEventListener("click", () => {
  if (!app.mic) return;
  app.mic.muted = !app.mic.muted;
  ui.mute.textContent = app.mic.muted ? "Unmute" : "Mute";
  ui.mute.setAttribute("aria-pressed", String(app.mic.muted));
});

// -- the status line ------------------------------------------------------------------------

setInterval(() => {
  const c = app.conversation;
  if (c) {
    const quiet = (performance.now() - c.lastMessage) / 1000;
    if (c.socket.readyState === WebSocket.OPEN) {
      if (!c.handshake && quiet > HANDSHAKE_TIMEOUT_S) {
        notify(`No handshake from the server in ${HANDSHAKE_TIMEOUT_S} s.`);
        c.socket.close();
      } else if (c.handshake && quiet > SILENCE_TIMEOUT_S) {
        notify(`The server said nothing for ${SILENCE_TIMEOUT_S} s; the conversation is closed.`);
        c.socket.close();
      }
    }
    // How far the model's voice trails the microphone: both streams start at the handshake
    // and the model answers one frame for each frame it hears.
    const lag = Math.max(0, Math.round((c.sent - c.received) * 1000));
    ui.lag.textContent = c.handshake ? `${lag} ms` : "-";
    ui.step.textContent = c.stepMs === null ? "-" : `${Math.round(c.stepMs)} ms`;
    ui.rtt.textContent = c.rttMs === null ? "-" : `${Math.round(c.rttMs)} ms`;
    const now = performance.now();
    const due = now - c.lastPing > PING_EVERY_S * 1000;
    if (c.pings && due && c.socket.readyState === WebSocket.OPEN) {
      c.lastPing = now;
      c.socket.send(encodePing(now));
    }
  }
  ui.buffer.textContent = app.player ? `${Math.round(app.player.buffered * 1000)} ms` : "-";
  ui.underruns.textContent = app.player ? String(app.player.underruns) : "0";
  const db = 20 * Math.log10(Math.max(app.mic && !app.mic.muted ? app.mic.level : 0, 1e-6));
  ui.level.value = Math.max(0, Math.min(60, db + 60));
}, 250);

const rmsOf = ({ samples, sumSquares }) => (samples ? Math.sqrt(sumSquares / samples) : 0);

/** What the page has done, for checks run from outside (the browser test reads it). */
window.moshivis = {
  stats() {
    const p = app.player;
    const c = app.conversation;
    return {
      ...app.stats,
      state: ui.state.dataset.kind,
      path: c ? (c.pcm ? "pcm" : "opus") : null,
      sentSeconds: c?.sent ?? 0,
      roundTripMs: c?.rttMs ?? null,
      stepMs: c?.stepMs ?? null,
      receivedSeconds: c?.received ?? 0,
      scheduledSamples: p?.scheduled.samples ?? 0,
      scheduledRms: p ? rmsOf(p.scheduled) : 0,
      playedSamples: p?.played.samples ?? 0,
      playedRms: p ? rmsOf(p.played) : 0,
      playedPeak: p?.played.peak ?? 0,
      underruns: p?.underruns ?? 0,
      micLevel: app.mic?.level ?? 0,
      microphoneOpen: app.mic !== null,
      words: ui.transcript.querySelectorAll("span[data-gate]").length,
      transcript: ui.transcript.textContent,
      picture: app.picture ? app.picture.bytes.length : 0,
    };
  },
};

drawLegend();
recolour([]);
setState("idle", "idle");
checkSecureContext();
if (forcePcm) ui.path.textContent = "audio: PCM";
