/* ApiFast charts: a tiny dependency-free SVG renderer for line and bar charts.
 *
 * A chart spec: {id, title, unit: "usd"|"count"|"pct"|"ms", kind: "line"|"bar",
 * stacked: bool, x: [labels], series: [{name, values: ["1.5", ...]}]}.
 * Values arrive as decimal strings (money stays exact); they become numbers only to place
 * pixels, and tooltips show the original strings.
 *
 * On a page, <script type="application/json" id="chart-data">{"charts": [...]}</script>
 * and <div class="chart" data-chart="ID"></div> are paired up on load. Other scripts call
 * ApiFastCharts.render(element, spec).
 */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var H = 220, L = 64, R = 12, T = 12, B = 30;
  var PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, attrs) {
    var t = el("text", attrs || {}, parent);
    t.setAttribute("x", x); t.setAttribute("y", y);
    t.textContent = content;
    return t;
  }

  function fmt(unit, value) {
    if (unit === "usd") return "$" + value;
    if (unit === "pct") return value + "%";
    if (unit === "ms") return value + " ms";
    return String(value);
  }

  function niceStep(max, ticks) {
    var raw = max / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw))), n = raw / mag;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
  }

  function tickLabel(unit, v, step) {
    var digits = step >= 1 ? 0 : Math.min(12, Math.ceil(-Math.log10(step)));
    return fmt(unit, v.toFixed(digits));
  }

  function render(container, spec) {
    container.textContent = "";
    var fig = document.createElement("figure");
    fig.className = "chart-figure";
    var cap = document.createElement("figcaption");
    cap.textContent = spec.title || "";
    fig.appendChild(cap);
    container.appendChild(fig);
    var series = spec.series || [], xs = spec.x || [];
    var nums = series.map(function (s) { return s.values.map(function (v) { return parseFloat(v) || 0; }); });
    var stacked = !!spec.stacked && spec.kind === "bar";
    var max = 0;
    for (var i = 0; i < xs.length; i++) {
      var sum = 0;
      for (var s = 0; s < nums.length; s++) {
        var v = nums[s][i] || 0;
        sum += v;
        if (!stacked && v > max) max = v;
      }
      if (stacked && sum > max) max = sum;
    }
    if (!xs.length || !series.length) {
      var empty = document.createElement("p");
      empty.className = "chart-empty";
      empty.textContent = "No data in this range.";
      fig.appendChild(empty);
      return;
    }
    // Drawn at the box's own width, so that text keeps its size on any screen.
    var W = Math.max(280, Math.round(container.getBoundingClientRect().width) || 640);
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": spec.title || "chart", "class": "chart-svg"}, fig);
    var step = max > 0 ? niceStep(max, 4) : 1;
    var top = max > 0 ? Math.ceil(max / step) * step : 4;
    var plotW = W - L - R, plotH = H - T - B;
    function y(v) { return T + plotH - (v / top) * plotH; }
    for (var t = 0; t <= top + step / 2; t += step) {
      el("line", {x1: L, x2: W - R, y1: y(t), y2: y(t), "class": "grid"}, svg);
      text(svg, L - 6, y(t) + 4, tickLabel(spec.unit, t, step), {"text-anchor": "end", "class": "tick"});
    }
    var n = xs.length, slot = plotW / n;
    // "2026-03-10 14:00" becomes "03-10 14:00"; about one label per 70 px.
    var every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(plotW / 70))));
    for (var j = 0; j < n; j += every) {
      var label = String(xs[j]);
      if (/^\d{4}-\d\d-\d\d/.test(label)) label = label.slice(5);
      if (label.length > 14) label = label.slice(0, 13) + "…";
      text(svg, L + slot * (j + 0.5), H - B + 16, label, {"text-anchor": "middle", "class": "tick"});
    }
    if (spec.kind === "bar") {
      var groups = stacked ? 1 : nums.length, bw = Math.max(1, Math.min(40, (slot * 0.8) / groups));
      var pad = (slot - bw * groups) / 2;
      for (var b = 0; b < n; b++) {
        var base = 0;
        for (var k = 0; k < nums.length; k++) {
          var val = nums[k][b] || 0, x0 = L + slot * b + pad + (stacked ? 0 : k * bw);
          var y0 = stacked ? y(base + val) : y(val), hgt = stacked ? y(base) - y(base + val) : y(0) - y(val);
          var rect = el("rect", {x: x0, y: y0, width: bw, height: Math.max(0, hgt), fill: PALETTE[k % PALETTE.length]}, svg);
          el("title", {}, rect).textContent = xs[b] + " · " + series[k].name + ": " + fmt(spec.unit, series[k].values[b]);
          base += val;
        }
      }
    } else {
      for (var m = 0; m < nums.length; m++) {
        var color = PALETTE[m % PALETTE.length], pts = [];
        for (var p = 0; p < n; p++) pts.push((L + slot * (p + 0.5)).toFixed(1) + "," + y(nums[m][p] || 0).toFixed(1));
        el("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2}, svg);
        for (var q = 0; q < n; q++) {
          var dot = el("circle", {cx: L + slot * (q + 0.5), cy: y(nums[m][q] || 0), r: n > 60 ? 1.5 : 3, fill: color}, svg);
          el("title", {}, dot).textContent = xs[q] + " · " + series[m].name + ": " + fmt(spec.unit, series[m].values[q]);
        }
      }
    }
    var legend = document.createElement("ul");
    legend.className = "chart-legend";
    series.forEach(function (s, idx) {
      var li = document.createElement("li");
      var sw = el("svg", {width: 10, height: 10, "aria-hidden": "true"});
      el("rect", {width: 10, height: 10, fill: PALETTE[idx % PALETTE.length]}, sw);
      li.appendChild(sw);
      li.appendChild(document.createTextNode(" " + s.name));
      legend.appendChild(li);
    });
    fig.appendChild(legend);
  }

  function renderPage() {
    var data = document.getElementById("chart-data");
    if (!data) return;
    var specs = JSON.parse(data.textContent).charts || [];
    specs.forEach(function (spec) {
      var box = document.querySelector('[data-chart="' + spec.id + '"]');
      if (box) render(box, spec);
    });
  }

  window.ApiFastCharts = {render: render};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", renderPage);
  else renderPage();
})();
