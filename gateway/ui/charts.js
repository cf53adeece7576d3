// Charts on <canvas>: per-row sparklines and a time-series line chart.  Colours come from the
// stylesheet's custom properties (--c-<series>), so the theme lives in one place.

export const SPARK_WIDTH = 96;
export const SPARK_HEIGHT = 22;

let colours = null;

function colour(name) {
  if (colours === null) {
    colours = new Map();
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
      colours = null;
    });
  }
  let value = colours.get(name);
  if (value === undefined) {
    value = getComputedStyle(document.documentElement).getPropertyValue(`--${name}`).trim();
    value = value || "#888";
    colours.set(name, value);
  }
  return value;
}

function context(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.round(width * ratio);
  const h = Math.round(height * ratio);
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return ctx;
}

/** A canvas for drawSparkline, sized by the stylesheet's .spark rule. */
export function sparklineCanvas(label) {
  const canvas = document.createElement("canvas");
  canvas.className = "spark";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", label);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(SPARK_WIDTH * ratio);
  canvas.height = Math.round(SPARK_HEIGHT * ratio);
  return canvas;
}

/**
 * The last ``capacity`` values, newest at the right edge, scaled to their own maximum.
 * Gaps (null) break the line.
 */
export function drawSparkline(canvas, values, capacity, series = "c-out") {
  const width = SPARK_WIDTH;
  const height = SPARK_HEIGHT;
  const ctx = context(canvas, width, height);
  let max = 0;
  for (const v of values) if (v !== null && v > max) max = v;
  const step = width / Math.max(1, capacity - 1);
  const offset = width - (values.length - 1) * step;
  const y = (v) => height - 2 - (max > 0 ? (v / max) * (height - 4) : 0);
  ctx.lineWidth = 1.25;
  ctx.strokeStyle = colour(max > 0 ? series : "c-muted");
  ctx.fillStyle = colour(series);
  let open = false;
  let firstX = null;
  let lastX = 0;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = offset + i * step;
    if (v === null) {
      open = false;
      return;
    }
    if (!open) {
      ctx.moveTo(x, y(v));
      if (firstX === null) firstX = x;
      open = true;
    } else ctx.lineTo(x, y(v));
    lastX = x;
  });
  ctx.stroke();
  if (max > 0 && firstX !== null) {
    ctx.lineTo(lastX, height);
    ctx.lineTo(firstX, height);
    ctx.globalAlpha = 0.18;
    ctx.fill();
    ctx.globalAlpha = 1;
  }
}

function niceStep(range, ticks) {
  const raw = range / ticks;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const fraction = raw / magnitude;
  const nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  return nice * magnitude;
}

/**
 * Lines over time.  ``series``: [{key, label, colour}] where colour names a --c-* property;
 * draw(times, {key: values}) with values aligned to times (unix seconds), null for gaps.
 */
export class LineChart {
  constructor({ title, series, format, span }) {
    this.series = series;
    this.format = format;
    this.span = span; // seconds shown, newest at the right edge
    this.data = null;
    this.width = 0;
    this.height = 0;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "chart-canvas";
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", title);
    this.readout = document.createElement("div");
    this.readout.className = "chart-legend";
    this.values = new Map();
    for (const s of series) {
      const swatch = document.createElement("span");
      swatch.className = `swatch ${s.colour}`;
      const value = document.createElement("strong");
      value.textContent = "–";
      const item = document.createElement("span");
      item.append(swatch, `${s.label} `, value);
      this.readout.append(item);
      this.values.set(s.key, value);
    }
    const heading = document.createElement("h3");
    heading.textContent = title;
    this.element = document.createElement("figure");
    this.element.className = "chart";
    const caption = document.createElement("figcaption");
    caption.append(heading, this.readout);
    this.element.append(caption, this.canvas);
    this.observer = new ResizeObserver((entries) => {
      const box = entries[0].contentRect;
      this.width = box.width;
      this.height = box.height;
      this.paint();
    });
    this.observer.observe(this.canvas);
  }

  draw(times, data) {
    this.data = { times, data };
    for (const s of this.series) {
      const values = data[s.key] || [];
      const last = values.length ? values[values.length - 1] : null;
      const text = this.format(last);
      const cell = this.values.get(s.key);
      if (cell.textContent !== text) cell.textContent = text;
    }
    this.paint();
  }

  dispose() {
    this.observer.disconnect();
  }

  paint() {
    if (!this.data || this.width < 40 || this.height < 40) return;
    const { times, data } = this.data;
    const width = this.width;
    const height = this.height;
    const ctx = context(this.canvas, width, height);
    const left = 56;
    const right = 8;
    const top = 8;
    const bottom = 20;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    let max = 0;
    for (const s of this.series) {
      for (const v of data[s.key] || []) if (v !== null && v > max) max = v;
    }
    const step = niceStep(max > 0 ? max : 1, 4);
    const top_value = Math.max(step, Math.ceil(max / step) * step);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.lineWidth = 1;
    // grid and y labels
    ctx.strokeStyle = colour("c-grid");
    ctx.fillStyle = colour("c-muted");
    ctx.textAlign = "right";
    for (let v = 0; v <= top_value + step / 2; v += step) {
      const y = Math.round(top + plotH - (v / top_value) * plotH) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(left + plotW, y);
      ctx.stroke();
      ctx.fillText(this.format(v), left - 6, y);
    }
    // x labels: seconds before the newest snapshot
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const ago of [this.span, (this.span * 2) / 3, this.span / 3, 0]) {
      const x = left + plotW - (ago / this.span) * plotW;
      ctx.fillText(ago === 0 ? "now" : `-${Math.round(ago)} s`, x, top + plotH + 5);
    }
    if (!times.length) return;
    const newest = times[times.length - 1];
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 1, plotW, plotH + 2);
    ctx.clip();
    ctx.lineWidth = 1.75;
    ctx.lineJoin = "round";
    for (const s of this.series) {
      const values = data[s.key] || [];
      ctx.strokeStyle = colour(s.colour);
      ctx.beginPath();
      let open = false;
      let previous = null;
      values.forEach((v, i) => {
        const t = times[i];
        // a gap in time (feed down for a while) breaks the line too
        if (v === null || (previous !== null && t - previous > 5)) open = false;
        previous = t;
        if (v === null) return;
        const x = left + plotW - ((newest - t) / this.span) * plotW;
        const y = top + plotH - (v / top_value) * plotH;
        if (open) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
        open = true;
      });
      ctx.stroke();
    }
    ctx.restore();
  }
}
