// Ogg pages for Opus audio (RFC 3533, RFC 7845): what the page sends is a live Ogg Opus
// stream (one Opus packet per page, so each 20 ms packet leaves at once), and what it
// receives is the server's Ogg Opus stream, cut anywhere between websocket messages.

// CRC-32 with Ogg's polynomial 0x04c11db7: not reflected, initial value 0, no final xor.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc;
}

const FLAG_CONTINUED = 0x01;
const FLAG_FIRST = 0x02;
const HEADER_SIZE = 27;
const MAGIC = [0x4f, 0x67, 0x67, 0x53]; // "OggS"

/** One Ogg page holding `segments` (lacing values) over `body`. */
function page({ flags, granule, serial, sequence, lacing, body }) {
  const out = new Uint8Array(HEADER_SIZE + lacing.length + body.length);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  out[4] = 0; // stream structure version
  out[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  view.setUint32(22, 0, true); // the CRC is computed with this field zero
  out[26] = lacing.length;
  out.set(lacing, HEADER_SIZE);
  out.set(body, HEADER_SIZE + lacing.length);
  view.setUint32(22, oggCrc(out), true);
  return out;
}

/** Lacing values of one packet: 255 for each full 255 bytes, then the rest (maybe 0). */
function lacingOf(length) {
  const lacing = new Array(Math.floor(length / 255)).fill(255);
  lacing.push(length % 255);
  return lacing;
}

const ASCII = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** The Opus identification header (RFC 7845 section 5.1), mono, channel mapping 0. */
export function opusHead({ preSkip = 312, inputRate = 24000, channels = 1 } = {}) {
  const out = new Uint8Array(19);
  const view = new DataView(out.buffer);
  out.set(ASCII("OpusHead"), 0);
  out[8] = 1; // version
  out[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputRate, true);
  view.setInt16(16, 0, true); // output gain
  out[18] = 0; // mapping family
  return out;
}

/** The Opus comment header (RFC 7845 section 5.2): a vendor string and no comments. */
export function opusTags(vendor = "moshivis-mlx web page") {
  const v = new TextEncoder().encode(vendor);
  const out = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(out.buffer);
  out.set(ASCII("OpusTags"), 0);
  view.setUint32(8, v.length, true);
  out.set(v, 12);
  view.setUint32(12 + v.length, 0, true);
  return out;
}

/** Reads an OpusHead packet; null when the packet is not one. */
export function parseOpusHead(packet) {
  if (packet.length < 19 || String.fromCharCode(...packet.subarray(0, 8)) !== "OpusHead") {
    return null;
  }
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return {
    version: packet[8],
    channels: packet[9],
    preSkip: view.getUint16(10, true),
    inputRate: view.getUint32(12, true),
    outputGain: view.getInt16(16, true),
    mappingFamily: packet[18],
  };
}

/**
 * Writes one logical Ogg Opus stream page by page. `headers()` gives the two header
 * pages; `packet(bytes, samples48k)` gives the page(s) carrying one audio packet, the
 * granule position advanced by the packet's duration in 48 kHz samples (Ogg Opus always
 * counts at 48 kHz, whatever the input rate).
 */
export class OggOpusWriter {
  constructor({
    serial = (Math.random() * 0x100000000) >>> 0, preSkip = 312, inputRate = 24000,
  } = {}) {
    this.serial = serial >>> 0;
    this.preSkip = preSkip;
    this.inputRate = inputRate;
    this.sequence = 0;
    this.granule = 0;
  }

  headers() {
    const head = opusHead({ preSkip: this.preSkip, inputRate: this.inputRate });
    const headPages = this.#pages(head, 0, FLAG_FIRST);
    const tags = this.#pages(opusTags(), 0, 0);
    return concat([...headPages, ...tags]);
  }

  packet(bytes, samples48k) {
    this.granule += samples48k;
    return concat(this.#pages(bytes, this.granule, 0));
  }

  /** One packet as pages of at most 255 lacing values; a packet that does not fit in
   * one page continues on the next (flag 0x01), and only the page where it ends carries
   * the granule position (the others carry -1). */
  #pages(bytes, granule, flags) {
    const lacing = lacingOf(bytes.length);
    const pages = [];
    let offset = 0;
    for (let first = 0; first < lacing.length; first += 255) {
      const lace = lacing.slice(first, first + 255);
      const size = lace.reduce((a, b) => a + b, 0);
      const ends = first + 255 >= lacing.length;
      pages.push(page({
        flags: first > 0 ? FLAG_CONTINUED : flags,
        granule: ends ? granule : -1,
        serial: this.serial,
        sequence: this.sequence++,
        lacing: lace,
        body: bytes.subarray(offset, offset + size),
      }));
      offset += size;
    }
    return pages;
  }
}

export function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Reads an Ogg stream fed in arbitrary pieces (`push(bytes)` returns the packets it
 * completed, in order). Pages with a bad checksum are dropped and counted; bytes that
 * are not a page are skipped up to the next "OggS". One logical stream is followed at a
 * time: a page that begins a stream (flag 0x02) starts following it, so that a chained
 * stream (an encoder started afresh) goes on, and its first packet comes with `first`;
 * pages of any other stream are ignored. Bounded: a page is at most 65,307 bytes and a
 * packet spanning pages at most `maxPacket` bytes.
 */
export class OggReader {
  constructor({ maxPacket = 1 << 20 } = {}) {
    this.maxPacket = maxPacket;
    this.buffer = new Uint8Array(0);
    this.partial = [];
    this.partialSize = 0;
    this.serial = null;
    this.badPages = 0;
    this.skippedBytes = 0;
    this.pages = 0;
  }

  push(bytes) {
    this.buffer = this.buffer.length ? concat([this.buffer, bytes]) : Uint8Array.from(bytes);
    const packets = [];
    for (;;) {
      const start = findMagic(this.buffer);
      if (start < 0) {
        // Keep the last 3 bytes: they may be the start of "OggS".
        const keep = Math.min(3, this.buffer.length);
        this.skippedBytes += this.buffer.length - keep;
        this.buffer = this.buffer.slice(this.buffer.length - keep);
        return packets;
      }
      if (start > 0) {
        this.skippedBytes += start;
        this.buffer = this.buffer.slice(start);
      }
      if (this.buffer.length < HEADER_SIZE) return packets;
      const nSegments = this.buffer[26];
      if (this.buffer.length < HEADER_SIZE + nSegments) return packets;
      const lacing = this.buffer.subarray(HEADER_SIZE, HEADER_SIZE + nSegments);
      const size = HEADER_SIZE + nSegments + lacing.reduce((a, b) => a + b, 0);
      if (this.buffer.length < size) return packets;
      const raw = this.buffer.slice(0, size);
      this.buffer = this.buffer.slice(size);
      if (!checksumOk(raw)) {
        this.badPages++;
        // Resynchronise just past this "OggS": the real page may start inside it.
        this.buffer = concat([raw.subarray(1), this.buffer]);
        continue;
      }
      this.#page(raw, nSegments, packets);
    }
  }

  #page(raw, nSegments, packets) {
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const flags = raw[5];
    const serial = view.getUint32(14, true);
    const begins = Boolean(flags & FLAG_FIRST);
    if (begins || this.serial === null) {
      this.serial = serial;
      this.partial = [];
      this.partialSize = 0;
    }
    if (serial !== this.serial) return;
    this.pages++;
    const granule = Number(view.getBigInt64(6, true));
    if (!(flags & FLAG_CONTINUED) && this.partial.length) {
      this.partial = []; // a lost page: the packet it continued cannot be completed
      this.partialSize = 0;
    }
    let offset = HEADER_SIZE + nSegments;
    for (let i = 0; i < nSegments; i++) {
      const n = raw[HEADER_SIZE + i];
      this.partialSize += n;
      if (this.partialSize > this.maxPacket) {
        throw new Error(`an Ogg packet over ${this.maxPacket} bytes`);
      }
      this.partial.push(raw.subarray(offset, offset + n));
      offset += n;
      if (n < 255) {
        packets.push({
          data: concat(this.partial), granule, last: i === nSegments - 1, first: begins && i === 0,
        });
        this.partial = [];
        this.partialSize = 0;
      }
    }
  }
}

function findMagic(bytes) {
  for (let i = 0; i + 3 < bytes.length; i++) {
    if (MAGIC.every((b, k) => bytes[i + k] === b)) return i;
  }
  return -1;
}

function checksumOk(raw) {
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const stored = view.getUint32(22, true);
  const copy = raw.slice();
  copy[22] = copy[23] = copy[24] = copy[25] = 0;
  return oggCrc(copy) === stored;
}
