// The transcript's colours: each word coloured by the cross-attention gate of the moment it
// was spoken (how much the model was looking at the picture), on the terminal UI's ramp.

// Gate 0 -> 1: dim blue, violet, red, yellow (readable on dark and light backgrounds).
export const GATE_RAMP = [
  [0.0, [90, 110, 200]],
  [0.35, [160, 80, 220]],
  [0.7, [235, 70, 90]],
  [1.0, [250, 200, 40]],
];

export function gateRgb(gate) {
  const g = Math.min(1, Math.max(0, gate));
  for (let i = 1; i < GATE_RAMP.length; i++) {
    const [x0, c0] = GATE_RAMP[i - 1];
    const [x1, c1] = GATE_RAMP[i];
    if (g <= x1) {
      const f = (g - x0) / (x1 - x0);
      return c0.map((a, k) => Math.round(a + f * (c1[k] - a)));
    }
  }
  return GATE_RAMP[GATE_RAMP.length - 1][1];
}

export const cssRgb = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

/**
 * The gate carried by a coloured-text message's colour byte. MoshiVis servers send
 * round(clamp((gate - 0.005) / 0.016, 0, 1) * 10); this is the middle of that byte's bin.
 */
export const gateOfColor = (color) => 0.005 + 0.016 * Math.min(10, Math.max(0, color)) / 10;

/**
 * Maps gates onto the ramp over the range seen recently. MoshiVis' gate idles near 0.02
 * and rises when the picture matters, so a fixed 0..1 scale would paint every word the
 * same colour; the legend shows the actual range.
 */
export class GateScale {
  static MIN_SPAN = 0.02;

  constructor(keep = 600) {
    this.keep = keep;
    this.recent = [];
  }

  add(gate) {
    this.recent.push(gate);
    if (this.recent.length > this.keep) this.recent.shift();
  }

  bounds() {
    if (!this.recent.length) return [0, 1];
    let lo = Math.min(...this.recent);
    let hi = Math.max(...this.recent);
    if (hi - lo < GateScale.MIN_SPAN) {
      const mid = (lo + hi) / 2;
      lo = Math.max(0, mid - GateScale.MIN_SPAN / 2);
      hi = mid + GateScale.MIN_SPAN / 2;
    }
    return [lo, hi];
  }

  rgb(gate) {
    const [lo, hi] = this.bounds();
    return gateRgb((gate - lo) / (hi - lo));
  }
}
