// Kyutai's websocket protocol (the Moshi and MoshiVis servers and clients): every message
// is binary, one kind byte then the payload. 0x81 is ours: raw PCM audio for browsers
// without WebCodecs audio (the page asks for it with `audio=pcm` on /api/chat).

export const KIND = Object.freeze({
  HANDSHAKE: 0x00, // server -> client: ready (after the image, for MoshiVis)
  AUDIO: 0x01, // Ogg Opus pages, 24 kHz mono, both ways
  TEXT: 0x02, // UTF-8 text
  CONTROL: 0x03, // one action byte
  METADATA: 0x04, // UTF-8 JSON
  ERROR: 0x05, // UTF-8 message
  PING: 0x06, // no payload
  COLORED_TEXT: 0x07, // one colour byte (0..10: the cross-attention gate), then UTF-8 text
  IMAGE: 0x08, // client -> server: an image file's bytes
  RATING: 0x0a, // client -> server: one byte
  PCM: 0x81, // ours: 16-bit signed little-endian mono PCM at 24 kHz, up to 24,000 samples
});

export const CONTROL = Object.freeze({ start: 0x00, endTurn: 0x01, pause: 0x02, restart: 0x03 });

export const PCM_RATE = 24000;
export const PCM_MAX_SAMPLES = 24000;

function framed(kind, payload) {
  const out = new Uint8Array(1 + payload.length);
  out[0] = kind;
  out.set(payload, 1);
  return out;
}

export const encodeAudio = (oggBytes) => framed(KIND.AUDIO, oggBytes);
export const encodeImage = (fileBytes) => framed(KIND.IMAGE, fileBytes);
export const encodeText = (text) => framed(KIND.TEXT, new TextEncoder().encode(text));
export const encodeControl = (action) => framed(KIND.CONTROL, [CONTROL[action]]);
export const encodeRating = (value) => framed(KIND.RATING, [value & 0xff]);

/** A ping carrying the time it was sent (8 bytes, a float64 of milliseconds); a server
 * that echoes pings (ours does) gives the round trip. */
export function encodePing(ms) {
  const out = new Uint8Array(9);
  out[0] = KIND.PING;
  new DataView(out.buffer).setFloat64(1, ms, true);
  return out;
}

/** Float samples in [-1, 1] as 0x81 messages of at most 24,000 16-bit samples each. */
export function encodePcm(samples) {
  const messages = [];
  for (let start = 0; start < samples.length || start === 0; start += PCM_MAX_SAMPLES) {
    const part = samples.subarray(start, start + PCM_MAX_SAMPLES);
    const out = new Uint8Array(1 + 2 * part.length);
    out[0] = KIND.PCM;
    const view = new DataView(out.buffer);
    for (let i = 0; i < part.length; i++) {
      const s = Math.max(-1, Math.min(1, part[i]));
      view.setInt16(1 + 2 * i, Math.round(s * 32767), true);
    }
    messages.push(out);
    if (samples.length === 0) break;
  }
  return messages;
}

/** 16-bit little-endian PCM bytes as float samples in [-1, 1). */
export function pcmToFloat(bytes) {
  if (bytes.length % 2 !== 0) throw new Error("PCM audio with an odd number of bytes");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

/** A received message as {kind, ...}; a kind the page does not know is {kind: "unknown"}. */
export function decodeMessage(data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (bytes.length === 0) return { kind: "empty" };
  const payload = bytes.subarray(1);
  const text = () => new TextDecoder().decode(payload);
  switch (bytes[0]) {
    case KIND.HANDSHAKE:
      return { kind: "handshake", version: payload[0] ?? 0, model: payload[1] ?? 0 };
    case KIND.AUDIO:
      return { kind: "audio", data: payload };
    case KIND.TEXT:
      return { kind: "text", text: text() };
    case KIND.CONTROL:
      return {
        kind: "control",
        action: Object.keys(CONTROL).find((k) => CONTROL[k] === payload[0]) ?? null,
      };
    case KIND.METADATA: {
      try {
        return { kind: "metadata", data: JSON.parse(text()) };
      } catch {
        return { kind: "metadata", data: null };
      }
    }
    case KIND.ERROR:
      return { kind: "error", text: text() };
    case KIND.PING:
      if (payload.length !== 8) return { kind: "ping", sent: null };
      return {
        kind: "ping",
        sent: new DataView(payload.buffer, payload.byteOffset, 8).getFloat64(0, true),
      };
    case KIND.COLORED_TEXT:
      return {
        kind: "coloredtext",
        color: payload[0] ?? 0,
        text: new TextDecoder().decode(payload.subarray(1)),
      };
    case KIND.PCM:
      return { kind: "pcm", samples: pcmToFloat(payload) };
    default:
      return { kind: "unknown", code: bytes[0] };
  }
}
