// The relay's demo page: talk to the Realtime API (or the bundled fake), two ways.
//
// WebSocket (through /voice): microphone → AudioWorklet (PCM16 24 kHz) →
// input_audio_buffer.append; reply audio deltas are scheduled back to back for gapless
// playback. When the server hears the user start speaking during a reply (barge-in),
// playback stops and the assistant item is truncated to what was really heard, so the
// model's memory matches the user's.
//
// WebRTC: the page sends its SDP offer to the relay (POST /v1/realtime/calls, with the
// token as a Bearer header); the relay creates the call with its own key and watches it
// from a sideband, and the audio and events flow between the page and the Realtime API
// directly (a peer connection and its "oai-events" data channel). The server plays the
// reply and truncates on barge-in itself; the page only listens, through the same worklet
// as a tap, to count what it played.
//
// Tests read the page through data-* attributes on <body>: data-state, data-transport
// (websocket or webrtc), data-call-id, data-turns, data-user-turns, data-sent-ms,
// data-received-ms, data-played-ms, data-playing, data-underruns (gaps inside a reply),
// data-latency-ms, data-truncations, data-error, and data-upstream ("fake" when
// session.created says the upstream is mockrealtime).

const RATE = 24000; // PCM16 mono, the API's only PCM rate
const CHUNK_SAMPLES = 960; // 40 ms per input_audio_buffer.append
const TRANSCRIBE_MODEL = "gpt-4o-mini-transcribe";
const TOKEN_RE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // what a subprotocol may hold
const LOUD = 0.01; // RMS above which a chunk of reply audio counts as played (WebRTC)
const ROUTES = {
  websocket: "WebSocket: audio goes through this server's <code>/voice</code>.",
  webrtc:
    "WebRTC: audio goes straight to the Realtime API; this server set the call up with its" +
    " own key (<code>/v1/realtime/calls</code>) and watches it.",
};

const $ = (id) => document.getElementById(id);
const body = document.body;
const ui = {
  connect: $("connect"),
  token: $("token"),
  echo: $("echo"),
  transcribe: $("transcribe"),
  status: $("status"),
  log: $("log"),
  empty: $("empty"),
  level: $("level"),
  turns: $("turns"),
  latency: $("latency"),
  median: $("median"),
  played: $("played"),
  error: $("error"),
  fake: $("fake"),
  route: $("route"),
  remote: $("remote"),
  transports: [...document.querySelectorAll('input[name="transport"]')],
};

function transport() {
  return ui.transports.find((radio) => radio.checked).value;
}

const stats = {
  turns: 0,
  userTurns: 0,
  sentMs: 0,
  receivedMs: 0,
  playedMs: 0,
  truncations: 0,
  latencies: [],
};
let session = null; // the live connection, see connect()

function setState(state, label) {
  body.dataset.state = state;
  ui.status.textContent = label || state;
  ui.status.className = `pill ${state}`;
  const busy = state === "connecting" || state === "live";
  ui.connect.textContent = busy ? "Disconnect" : "Connect";
  ui.connect.classList.toggle("danger", busy);
  ui.token.disabled = ui.echo.disabled = ui.transcribe.disabled = busy;
  for (const radio of ui.transports) radio.disabled = busy;
}

function showTransport() {
  const kind = transport();
  body.dataset.transport = kind;
  ui.route.innerHTML = ROUTES[kind];
}

function showStats() {
  body.dataset.turns = stats.turns;
  body.dataset.userTurns = stats.userTurns;
  body.dataset.sentMs = Math.round(stats.sentMs);
  body.dataset.receivedMs = Math.round(stats.receivedMs);
  body.dataset.playedMs = Math.round(stats.playedMs);
  body.dataset.truncations = stats.truncations;
  ui.turns.textContent = stats.turns;
  ui.played.textContent = `${(stats.playedMs / 1000).toFixed(1)} s`;
  const n = stats.latencies.length;
  if (n) {
    const last = stats.latencies[n - 1];
    const sorted = [...stats.latencies].sort((a, b) => a - b);
    body.dataset.latencyMs = Math.round(last);
    ui.latency.textContent = `${Math.round(last)} ms`;
    ui.median.textContent = `${Math.round(sorted[Math.floor((n - 1) / 2)])} ms`;
  }
}

function showError(message, code) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
  if (code) body.dataset.error = code;
}

// ---------------------------------------------------------------------------------
// Conversation view: one bubble per user turn and per assistant reply.

const bubbles = new Map(); // item id (or response id) → element

function bubble(key, role) {
  let el = bubbles.get(key);
  if (!el) {
    el = document.createElement("div");
    el.className = `turn ${role} pending`;
    el.dataset.role = role;
    el.innerHTML = '<span class="who"></span><p class="text"></p><span class="meta"></span>';
    el.querySelector(".who").textContent = role === "user" ? "You" : "Assistant";
    el.querySelector(".text").textContent = "…";
    bubbles.set(key, el);
    ui.empty.hidden = true;
    ui.log.append(el);
    ui.log.scrollTop = ui.log.scrollHeight;
  }
  return el;
}

function setText(el, text, { placeholder = false } = {}) {
  const p = el.querySelector(".text");
  p.textContent = text;
  p.classList.toggle("placeholder", placeholder);
  ui.log.scrollTop = ui.log.scrollHeight;
}

function joinMeta(...parts) {
  return parts.filter(Boolean).join(" · ");
}

function setMeta(el, text) {
  el.querySelector(".meta").textContent = text;
}

// ---------------------------------------------------------------------------------
// Playback: PCM16 deltas scheduled back to back on one AudioContext.

class Player {
  constructor(ctx, onPlayed) {
    this.ctx = ctx;
    this.onPlayed = onPlayed;
    this.out = ctx.createGain();
    this.out.connect(ctx.destination);
    this.next = 0; // context time at which the next chunk starts
    this.chunks = []; // {itemId, start, duration, source, done}
    this.heard = new Map(); // item id → seconds of its chunks that finished playing
    this.lastItem = null;
    this.underruns = 0;
    body.dataset.underruns = 0;
  }

  play(itemId, pcm) {
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 0x8000;
    const buffer = this.ctx.createBuffer(1, samples.length, RATE);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.out);
    // Back to back when we are ahead; a little slack when the network fell behind.
    const start = Math.max(this.next, this.ctx.currentTime + 0.03);
    if (itemId === this.lastItem && start > this.next) {
      // The previous chunk of this reply ran out before this one came: an audible gap.
      this.underruns += 1;
      body.dataset.underruns = this.underruns;
    }
    this.lastItem = itemId;
    const chunk = { itemId, start, duration: buffer.duration, source, done: false };
    source.onended = () => {
      chunk.done = true;
      this.heard.set(itemId, (this.heard.get(itemId) || 0) + chunk.duration);
      this.onPlayed(chunk.duration * 1000);
      this.chunks = this.chunks.filter((c) => !c.done);
      if (this.chunks.length === 0) body.dataset.playing = "false";
    };
    source.start(start);
    this.next = start + buffer.duration;
    this.chunks.push(chunk);
    body.dataset.playing = "true";
  }

  /** Milliseconds of the item heard so far: finished chunks plus the one playing. */
  playedMs(itemId) {
    const now = this.ctx.currentTime;
    let seconds = this.heard.get(itemId) || 0;
    for (const c of this.chunks) {
      if (c.itemId === itemId && !c.done) seconds += Math.min(Math.max(now - c.start, 0), c.duration);
    }
    return seconds * 1000;
  }

  isPlaying(itemId) {
    return this.chunks.some((c) => c.itemId === itemId && !c.done);
  }

  /** Stop everything now; report the partly played chunks as played. */
  stop() {
    const now = this.ctx.currentTime;
    for (const c of this.chunks) {
      c.source.onended = null;
      c.done = true;
      try {
        c.source.stop();
      } catch {
        /* already stopped */
      }
      const heard = Math.min(Math.max(now - c.start, 0), c.duration);
      if (heard > 0) this.onPlayed(heard * 1000);
    }
    this.chunks = [];
    this.next = 0;
    this.lastItem = null;
    body.dataset.playing = "false";
  }
}

// ---------------------------------------------------------------------------------
// Wire format helpers.

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64Pcm16(b64) {
  const text = atob(b64);
  const view = new DataView(new ArrayBuffer(text.length));
  for (let i = 0; i < text.length; i++) view.setUint8(i, text.charCodeAt(i));
  const pcm = new Int16Array(text.length >> 1);
  for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(i * 2, true);
  return pcm;
}

// ---------------------------------------------------------------------------------
// One connection: socket, audio graph, and the turn bookkeeping.

async function connect() {
  showError("");
  delete body.dataset.error;
  const token = ui.token.value.trim();
  if (token && !TOKEN_RE.test(token)) {
    showError(
      "The token may only hold letters, digits and !#$%&'*+-.^_`|~ (it is sent as a subprotocol).",
      "invalid_token",
    );
    return;
  }
  if (!window.isSecureContext || !navigator.mediaDevices) {
    showError(
      "The microphone needs a secure page: open it over https, or as http://localhost or http://127.0.0.1.",
      "insecure_context",
    );
    setState("error");
    return;
  }
  const kind = transport();
  setState("connecting", `connecting (${kind === "webrtc" ? "WebRTC" : "WebSocket"})…`);
  const s = {
    kind,
    ws: null,
    pc: null, // WebRTC: the peer connection and its data channel
    dc: null,
    ctx: null,
    stream: null,
    player: null,
    opened: false,
    closing: false,
    speechStoppedAt: null, // performance.now() of the last speech_stopped not yet answered
    assistant: new Map(), // item id → {el, text, truncated, responseId, meta}
    responses: new Map(), // response id → {firstAudio}
    lastError: null,
  };
  session = s;
  if (kind === "webrtc") return connectCall(s, token);
  try {
    s.ctx = new AudioContext();
    if (!s.ctx.audioWorklet) {
      throw new Error("this browser has no AudioWorklet; use a current Chrome, Edge, Firefox or Safari");
    }
    s.ctx.resume(); // not awaited: without a user gesture it may never settle
    // Module and socket first: the microphone's clock starts when it opens.
    await s.ctx.audioWorklet.addModule("/static/capture-worklet.js");
    s.player = new Player(s.ctx, (ms) => {
      stats.playedMs += ms;
      showStats();
    });
    await openSocket(s, token);
    const echo = ui.echo.checked;
    s.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: echo, noiseSuppression: echo, autoGainControl: echo },
    });
    if (session !== s || s.closing) return disconnect(s);
    startCapture(s);
  } catch (err) {
    if (session === s && !s.closing) {
      const message = err && err.name === "NotAllowedError"
        ? "Microphone permission was denied: allow it in the address bar and connect again."
        : `Could not start: ${err && err.message ? err.message : err}`;
      showError(s.lastError || message, "start_failed");
      setState("error");
      disconnect(s);
    }
  }
}

function openSocket(s, token) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  if (token) protocols.push(`relay-token.${token}`);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${scheme}://${location.host}/voice`, protocols);
    s.ws = ws;
    ws.onopen = () => {
      s.opened = true;
      resolve();
    };
    ws.onmessage = (message) => {
      try {
        onEvent(s, JSON.parse(message.data));
      } catch (err) {
        console.error("relay demo: bad event", err);
      }
    };
    ws.onclose = (close) => {
      reject(new Error(`the relay closed the connection (${close.code})`));
      if (session !== s) return;
      if (!s.closing && !s.opened) {
        // Browsers do not say why a handshake failed; the relay's log does.
        const hint = token
          ? "the relay refused the connection (is the token right?) or is not running."
          : "the relay is not running, or it refused the connection (does it need a token?).";
        showError(`Could not open ${ws.url}: ${hint}`, "connect_failed");
      } else if (!s.closing) {
        const why = s.lastError ? `: ${s.lastError}` : close.reason ? `: ${close.reason}` : "";
        const code = body.dataset.error || `close_${close.code}`;
        showError(`Connection closed (code ${close.code})${why}`, code);
      }
      const clean = s.closing || (close.code === 1000 && !s.lastError);
      setState(clean ? "closed" : "error", s.closing ? "disconnected" : `closed ${close.code}`);
      disconnect(s);
    };
  });
}

function startCapture(s) {
  const source = s.ctx.createMediaStreamSource(s.stream);
  let input = source;
  if (s.ctx.sampleRate > RATE) {
    // Anti-aliasing before the worklet decimates to 24 kHz (Nyquist 12 kHz).
    input = new BiquadFilterNode(s.ctx, { type: "lowpass", frequency: 0.45 * RATE, Q: 0.7 });
    source.connect(input);
  }
  const node = new AudioWorkletNode(s.ctx, "pcm16-capture", {
    processorOptions: { targetRate: RATE, chunkSamples: CHUNK_SAMPLES },
  });
  const sink = s.ctx.createGain();
  sink.gain.value = 0; // keeps the worklet pulled by the graph without echoing the mic
  input.connect(node).connect(sink).connect(s.ctx.destination);
  node.port.onmessage = ({ data }) => {
    ui.level.style.transform = `scaleX(${Math.min(1, data.level * 6).toFixed(3)})`;
    if (s.ws.readyState !== WebSocket.OPEN) return;
    s.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: toBase64(data.pcm) }));
    stats.sentMs += (CHUNK_SAMPLES / RATE) * 1000;
    body.dataset.sentMs = Math.round(stats.sentMs);
  };
  s.capture = { source, node, sink };
}

function send(s, event) {
  if (s.ws && s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify(event));
  if (s.dc && s.dc.readyState === "open") s.dc.send(JSON.stringify(event));
}

function disconnect(s) {
  s.closing = true;
  if (s.player) s.player.stop();
  if (s.stream) for (const track of s.stream.getTracks()) track.stop();
  if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "user disconnected");
  if (s.dc) s.dc.close();
  if (s.pc) s.pc.close(); // the call ends: the server hangs up when the peer goes
  ui.remote.srcObject = null;
  if (s.ctx && s.ctx.state !== "closed") s.ctx.close();
  ui.level.style.transform = "scaleX(0)";
}

// ---------------------------------------------------------------------------------
// WebRTC: the relay sets the call up; audio and events then go straight to the API.

async function connectCall(s, token) {
  try {
    s.ctx = new AudioContext();
    if (!s.ctx.audioWorklet) {
      throw new Error("this browser has no AudioWorklet; use a current Chrome, Edge, Firefox or Safari");
    }
    s.ctx.resume();
    await s.ctx.audioWorklet.addModule("/static/capture-worklet.js");
    const echo = ui.echo.checked;
    s.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: echo, noiseSuppression: echo, autoGainControl: echo },
    });
    if (session !== s || s.closing) return disconnect(s);
    const pc = new RTCPeerConnection();
    s.pc = pc;
    pc.ontrack = (event) => onRemoteTrack(s, event.streams[0] || new MediaStream([event.track]));
    pc.onconnectionstatechange = () => onCallState(s);
    for (const track of s.stream.getAudioTracks()) pc.addTrack(track, s.stream);
    showLevel(s, s.stream, (chunkMs) => {
      stats.sentMs += chunkMs; // what the microphone gave the call
      body.dataset.sentMs = Math.round(stats.sentMs);
    });
    const dc = pc.createDataChannel("oai-events");
    s.dc = dc;
    dc.onmessage = (message) => {
      try {
        onEvent(s, JSON.parse(message.data));
      } catch (err) {
        console.error("relay demo: bad event", err);
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const answer = await fetch("/v1/realtime/calls", { method: "POST", body: pc.localDescription.sdp, headers });
    if (!answer.ok) {
      const refused = await answer.json().catch(() => ({}));
      const e = refused.error || {};
      s.lastError = `${e.code || answer.status}: ${e.message || "the relay refused the call"}`;
      throw Object.assign(new Error(s.lastError), { code: e.code || `http_${answer.status}` });
    }
    s.callId = (answer.headers.get("Location") || "").split("/").pop();
    body.dataset.callId = s.callId;
    await pc.setRemoteDescription({ type: "answer", sdp: await answer.text() });
  } catch (err) {
    if (session === s && !s.closing) {
      const message = err && err.name === "NotAllowedError"
        ? "Microphone permission was denied: allow it in the address bar and connect again."
        : `Could not start the call: ${err && err.message ? err.message : err}`;
      showError(message, (err && err.code) || "start_failed");
      setState("error");
      disconnect(s);
    }
  }
}

function onCallState(s) {
  const state = s.pc.connectionState;
  if (session !== s || s.closing) return;
  if (state === "connected") {
    setState("live", "live · WebRTC");
  } else if (state === "failed" || state === "closed") {
    const why = s.lastError ? `: ${s.lastError}` : "";
    showError(`The call ended (${state})${why}`, body.dataset.error || `call_${state}`);
    setState(state === "failed" ? "error" : "closed", `call ${state}`);
    disconnect(s);
  }
}

/** The server's reply audio: heard through the <audio> element, counted through a tap. */
function onRemoteTrack(s, stream) {
  ui.remote.srcObject = stream; // Chrome delivers a remote track to Web Audio only while it plays
  ui.remote.play().catch(() => {});
  let last = 0;
  s.tap = tap(s, stream, (chunkMs, level) => {
    stats.receivedMs += chunkMs;
    if (level > LOUD) {
      stats.playedMs += chunkMs;
      body.dataset.playing = "true";
      last = performance.now();
    } else if (performance.now() - last > 200) {
      body.dataset.playing = "false";
    }
    showStats();
  });
}

function showLevel(s, stream, onChunk) {
  s.micTap = tap(s, stream, (chunkMs, level) => {
    ui.level.style.transform = `scaleX(${Math.min(1, level * 6).toFixed(3)})`;
    onChunk(chunkMs);
  });
}

/** Listen to ``stream`` through the capture worklet: ``onChunk(ms, rms)`` per chunk. */
function tap(s, stream, onChunk) {
  const source = s.ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(s.ctx, "pcm16-capture", {
    processorOptions: { targetRate: RATE, chunkSamples: CHUNK_SAMPLES },
  });
  const sink = s.ctx.createGain();
  sink.gain.value = 0; // pulled by the graph, never heard (the <audio> element plays it)
  source.connect(node).connect(sink).connect(s.ctx.destination);
  node.port.onmessage = ({ data }) => onChunk((CHUNK_SAMPLES / RATE) * 1000, data.level);
  return { source, node, sink };
}

// ---------------------------------------------------------------------------------
// Server events (GA names; unknown events and fields are ignored).

function onEvent(s, event) {
  switch (event.type) {
    case "session.created": {
      // mockrealtime marks its session.created (no real server sends this field): say so, as
      // its made-up transcripts and instant replies would otherwise read as a broken product.
      ui.fake.hidden = !event.mockrealtime;
      if (event.mockrealtime) body.dataset.upstream = "fake";
      else delete body.dataset.upstream;
      if (s.kind === "webrtc") {
        // The call's audio is the peer connection's; only transcription is the page's to ask.
        if (ui.transcribe.checked) {
          send(s, {
            type: "session.update",
            session: { type: "realtime", audio: { input: { transcription: { model: TRANSCRIBE_MODEL } } } },
          });
        }
        break;
      }
      // The audio this page speaks, whatever the relay set up (it may be configured for
      // phones); input transcription only when asked for, as it is billed separately.
      const input = { format: { type: "audio/pcm", rate: RATE } };
      if (ui.transcribe.checked) input.transcription = { model: TRANSCRIBE_MODEL };
      send(s, {
        type: "session.update",
        session: {
          type: "realtime",
          audio: { input, output: { format: { type: "audio/pcm", rate: RATE } } },
        },
      });
      setState("live", "live · WebSocket");
      break;
    }
    case "output_audio_buffer.started": {
      // WebRTC: the server started playing the reply (there are no audio deltas).
      if (s.speechStoppedAt !== null) {
        stats.latencies.push(performance.now() - s.speechStoppedAt);
        s.speechStoppedAt = null;
        showStats();
      }
      break;
    }
    case "input_audio_buffer.speech_started": {
      if (s.kind === "websocket") bargeIn(s); // over WebRTC the server stops its own playback
      const el = bubble(event.item_id, "user");
      el.dataset.startMs = event.audio_start_ms ?? "";
      setText(el, "listening…", { placeholder: true });
      body.dataset.speaking = "true";
      break;
    }
    case "input_audio_buffer.speech_stopped": {
      s.speechStoppedAt = performance.now();
      body.dataset.speaking = "false";
      const el = bubble(event.item_id, "user");
      el.classList.remove("pending");
      if (el.querySelector(".text").classList.contains("placeholder")) {
        // No transcript (yet): the session may not transcribe input. Show the turn itself.
        const start = Number(el.dataset.startMs);
        const seconds = (event.audio_end_ms - start) / 1000;
        const known = Number.isFinite(seconds) && seconds > 0;
        const spoken = known ? `${seconds.toFixed(1)} s of speech` : "speech";
        setText(el, spoken, { placeholder: true });
      }
      stats.userTurns += 1;
      showStats();
      break;
    }
    case "input_audio_buffer.committed": {
      const el = bubble(event.item_id, "user");
      el.classList.remove("pending");
      if (s.speechStoppedAt === null) s.speechStoppedAt = performance.now(); // a manual commit
      break;
    }
    case "conversation.item.input_audio_transcription.delta": {
      const el = bubble(event.item_id, "user");
      const p = el.querySelector(".text");
      const sofar = p.classList.contains("placeholder") ? "" : p.textContent;
      setText(el, sofar + (event.delta || ""));
      break;
    }
    case "conversation.item.input_audio_transcription.completed":
      setText(bubble(event.item_id, "user"), event.transcript || "(nothing recognised)", {
        placeholder: !event.transcript,
      });
      break;
    case "response.created":
      if (event.response) s.responses.set(event.response.id, { firstAudio: false });
      break;
    case "response.output_audio.delta":
      onAudio(s, event);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const item = assistantItem(s, event);
      if (item.truncated) break;
      item.text += event.delta || "";
      setText(item.el, item.text);
      break;
    }
    case "response.output_audio_transcript.done":
    case "response.output_text.done": {
      const item = assistantItem(s, event);
      if (item.truncated) break;
      item.text = event.transcript ?? event.text ?? item.text;
      setText(item.el, item.text);
      break;
    }
    case "response.done": {
      const response = event.response || {};
      for (const item of s.assistant.values()) {
        if (item.responseId === response.id) {
          const status = response.status;
          item.el.classList.remove("pending");
          if (status && status !== "completed") item.el.classList.add("interrupted");
          if (status === "cancelled" && !item.truncated) {
            setMeta(item.el, joinMeta(item.meta, "cancelled"));
          }
        }
      }
      stats.turns += 1;
      showStats();
      break;
    }
    case "conversation.item.truncated": {
      const item = s.assistant.get(event.item_id);
      const heard = `interrupted after ${(event.audio_end_ms / 1000).toFixed(1)} s`;
      if (item) setMeta(item.el, joinMeta(item.meta, heard));
      break;
    }
    case "error": {
      const e = event.error || {};
      s.lastError = `${e.code || e.type || "error"}: ${e.message || ""}`;
      showError(s.lastError, e.code || e.type || "error");
      break;
    }
    default:
      break;
  }
}

function assistantItem(s, event) {
  let item = s.assistant.get(event.item_id);
  if (!item) {
    item = {
      el: bubble(event.item_id, "assistant"),
      text: "",
      truncated: false,
      responseId: event.response_id,
      meta: "",
    };
    s.assistant.set(event.item_id, item);
  }
  return item;
}

function onAudio(s, event) {
  const item = assistantItem(s, event);
  if (item.truncated) return; // the user interrupted: drop the rest of this reply
  const response = s.responses.get(event.response_id) || { firstAudio: false };
  if (!response.firstAudio) {
    response.firstAudio = true;
    if (s.speechStoppedAt !== null) {
      const latency = performance.now() - s.speechStoppedAt;
      s.speechStoppedAt = null;
      stats.latencies.push(latency);
      item.meta = `${Math.round(latency)} ms to first audio`;
      setMeta(item.el, item.meta);
    }
  }
  const pcm = fromBase64Pcm16(event.delta);
  stats.receivedMs += (pcm.length / RATE) * 1000;
  s.player.play(event.item_id, pcm);
  showStats();
}

/** The user started speaking: stop the reply and tell the server how much was heard. */
function bargeIn(s) {
  for (const [itemId, item] of s.assistant) {
    if (item.truncated || !s.player.isPlaying(itemId)) continue;
    const heard = Math.floor(s.player.playedMs(itemId));
    item.truncated = true;
    s.player.stop();
    send(s, { type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: heard });
    item.el.classList.add("interrupted");
    stats.truncations += 1;
    showStats();
  }
}

ui.connect.addEventListener("click", () => {
  if (session && !session.closing && (body.dataset.state === "live" || body.dataset.state === "connecting")) {
    session.closing = true;
    setState("closed", "disconnected");
    disconnect(session);
  } else {
    connect();
  }
});

for (const radio of ui.transports) radio.addEventListener("change", showTransport);
const asked = new URLSearchParams(location.search).get("transport");
for (const radio of ui.transports) radio.checked = radio.value === (asked === "webrtc" ? "webrtc" : "websocket");
showTransport();
setState("idle", "disconnected");
showStats();
