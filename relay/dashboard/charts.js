// Small hand-drawn SVG charts: a histogram of durations and turns (with failures) over
// time. No library: a few rectangles and labels, scaled to the data.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 200;
const PAD = { left: 40, right: 12, top: 12, bottom: 40 };

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function frame(title, width = WIDTH) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const svg = svgEl("svg", {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    role: "img",
    "aria-label": title,
    preserveAspectRatio: "xMidYMid meet",
  });
  figure.append(caption, svg);
  return { figure, svg };
}

function empty(svg, width = WIDTH) {
  svg.append(svgEl("text", { x: width / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "axis" }, "no data yet"));
}

function axes(svg, maxCount, width = WIDTH) {
  const bottom = HEIGHT - PAD.bottom;
  svg.append(svgEl("line", { x1: PAD.left, y1: bottom, x2: width - PAD.right, y2: bottom, class: "axis-line" }));
  svg.append(svgEl("text", { x: PAD.left - 6, y: PAD.top + 8, "text-anchor": "end", class: "axis" }, maxCount));
  svg.append(svgEl("text", { x: PAD.left - 6, y: bottom, "text-anchor": "end", class: "axis" }, 0));
}

// Buckets on a log scale from the smallest to the largest value (durations spread over
// orders of magnitude).
export function histogram(values, title, format, buckets = 12) {
  const { figure, svg } = frame(title);
  figure.dataset.count = String(values.length);
  if (!values.length) {
    empty(svg);
    return figure;
  }
  const low = Math.max(1, Math.min(...values));
  const high = Math.max(low * 1.0001, Math.max(...values));
  const span = Math.log(high) - Math.log(low);
  const counts = new Array(buckets).fill(0);
  for (const value of values) {
    const at = span ? (Math.log(Math.max(value, low)) - Math.log(low)) / span : 0;
    counts[Math.min(buckets - 1, Math.floor(at * buckets))] += 1;
  }
  const maxCount = Math.max(...counts);
  axes(svg, maxCount);
  const inner = WIDTH - PAD.left - PAD.right;
  const height = HEIGHT - PAD.top - PAD.bottom;
  const width = inner / buckets;
  counts.forEach((count, index) => {
    const h = (count / maxCount) * height;
    const bar = svgEl("rect", {
      x: PAD.left + index * width + 1,
      y: HEIGHT - PAD.bottom - h,
      width: Math.max(1, width - 2),
      height: h,
      class: "bar",
    });
    const from = Math.exp(Math.log(low) + (span * index) / buckets);
    const to = Math.exp(Math.log(low) + (span * (index + 1)) / buckets);
    bar.append(svgEl("title", {}, `${format(from)} – ${format(to)}: ${count}`));
    svg.append(bar);
  });
  svg.append(svgEl("text", { x: PAD.left, y: HEIGHT - 18, class: "axis" }, format(low)));
  svg.append(svgEl("text", { x: WIDTH - PAD.right, y: HEIGHT - 18, "text-anchor": "end", class: "axis" }, format(high)));
  svg.append(svgEl("text", { x: WIDTH / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis" }, `${values.length} values, log scale`));
  return figure;
}

// Turns per time bucket, the failed part in red.
export function timeBars(points, title, format, width = WIDTH, buckets = 48) {
  const { figure, svg } = frame(title, width);
  figure.dataset.count = String(points.length);
  if (!points.length) {
    empty(svg, width);
    return figure;
  }
  const start = Math.min(...points.map((p) => p.at));
  const end = Math.max(start + 1000, Math.max(...points.map((p) => p.at)) + 1);
  const all = new Array(buckets).fill(0);
  const failed = new Array(buckets).fill(0);
  for (const point of points) {
    const index = Math.min(buckets - 1, Math.floor(((point.at - start) / (end - start)) * buckets));
    all[index] += 1;
    if (point.failed) failed[index] += 1;
  }
  const maxCount = Math.max(...all);
  axes(svg, maxCount, width);
  const inner = width - PAD.left - PAD.right;
  const height = HEIGHT - PAD.top - PAD.bottom;
  const step = inner / buckets;
  all.forEach((count, index) => {
    const x = PAD.left + index * step + 1;
    const h = (count / maxCount) * height;
    const f = (failed[index] / maxCount) * height;
    const bar = svgEl("rect", { x, y: HEIGHT - PAD.bottom - h, width: Math.max(1, step - 2), height: h - f, class: "bar" });
    bar.append(svgEl("title", {}, `${count} turns, ${failed[index]} failed`));
    svg.append(bar);
    if (f > 0) {
      svg.append(svgEl("rect", { x, y: HEIGHT - PAD.bottom - f, width: Math.max(1, step - 2), height: f, class: "bar-failed" }));
    }
  });
  svg.append(svgEl("text", { x: PAD.left, y: HEIGHT - 18, class: "axis" }, format(start)));
  svg.append(svgEl("text", { x: width - PAD.right, y: HEIGHT - 18, "text-anchor": "end", class: "axis" }, format(end)));
  const total = failed.reduce((a, b) => a + b, 0);
  svg.append(svgEl("text", { x: width / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis" }, `${points.length} turns, ${total} failed (red)`));
  return figure;
}
