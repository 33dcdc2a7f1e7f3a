/* edgefleet dashboard: keeps a page live and draws a device's charts with the vendored uPlot.
 *
 * Every few seconds it fetches the same page again and swaps each region marked data-live (by id), and
 * it fetches the device's series (JSON, column by column) and redraws the charts. Each chart's figure
 * carries data-points (points with data) and data-state (drawn | empty | no-sensor | no-data); the uPlot
 * instances are window.edgefleetCharts[key]. The model-quality charts draw the series' "quality" columns
 * (their own time axis: one point a quality window), as fleet/quality.py computed them. */
(function () {
  "use strict";
  var REFRESH_MS = Number(document.body.getAttribute("data-refresh-ms")) || 5000;
  var status = document.getElementById("live-status");
  var MIB = 1 / 1048576;
  // key -> fields [series key, label, scale, colour], digits shown, text when a device has no data at all
  var CHARTS = {
    latency: {fields: [["p50", "p50", 1, "#2f6fde"], ["p95", "p95", 1, "#e0a030"], ["p99", "p99", 1, "#d64541"]],
              digits: 2},
    errors: {fields: [["error_rate", "error rate %", 100, "#d64541"]], digits: 2},
    throughput: {fields: [["inferences_per_min", "inferences/min", 1, "#1f9d55"]], digits: 0},
    cpu: {fields: [["cpu_percent", "CPU %", 1, "#7b4fd6"]], digits: 1},
    memory: {fields: [["rss_bytes", "RSS MiB", MIB, "#0f8b8d"]], digits: 1},
    temperature: {fields: [["temperature_c", "°C", 1, "#d9682b"]], digits: 1, empty: "no sensor", free: true},
    // model quality (source: the series' "quality" columns); lines: the PSI bands' 0.1 and 0.25
    psi: {source: "quality", fields: [["psi", "PSI", 1, "#d64541"]], digits: 3, marks: true, trim: true,
          none: "no quality reports in this range yet", empty: "too few outputs a window to judge drift",
          lines: [[0.1, "#e0a030"], [0.25, "#d64541"]], floor: 0.3},
    canary: {source: "quality", fields: [["canary_agreement", "agreement %", 100, "#1f9d55"]], digits: 1,
             trim: true, marks: true, none: "no quality reports in this range yet",
             empty: "no canary run in this range", percent: true},
    accuracy: {source: "quality", fields: [["accuracy", "accuracy %", 100, "#2f6fde"]], digits: 1, marks: true,
               trim: true, none: "no quality reports in this range yet", empty: "no feedback labels in this range",
               percent: true}
  };
  var charts = {};
  window.edgefleetCharts = charts;

  function mark(ok) {
    if (!status) return;
    status.classList.toggle("stale", !ok);
    status.textContent = ok ? "live · " + new Date().toLocaleTimeString() : "connection lost · retrying";
  }

  // -- live regions ------------------------------------------------------------------------------
  function refreshRegions() {
    var regions = document.querySelectorAll("[data-live][id]");
    if (!regions.length) return Promise.resolve();
    return fetch(location.href, {headers: {Accept: "text/html"}, cache: "no-store"}).then(function (r) {
      if (r.redirected && new URL(r.url).pathname === "/login") {  // the session ended: sign in again
        location.assign(r.url);
        throw new Error("signed out");
      }
      if (!r.ok) throw new Error("page answered " + r.status);
      return r.text();
    }).then(function (text) {
      var doc = new DOMParser().parseFromString(text, "text/html");
      regions.forEach(function (el) {
        var fresh = doc.getElementById(el.id);
        if (!fresh) return;
        var open = Array.prototype.map.call(el.querySelectorAll("details"), function (d) { return d.open; });
        el.innerHTML = fresh.innerHTML;
        el.querySelectorAll("details").forEach(function (d, i) { if (open[i]) d.open = true; });
      });
    });
  }

  // -- charts ------------------------------------------------------------------------------------
  function spacing(s) {  // the typical time between points, for columns without duration_s
    var d = [];
    for (var i = 1; i < s.time.length; i++) d.push(s.time[i] - s.time[i - 1]);
    d.sort(function (a, b) { return a - b; });
    return d.length ? d[Math.floor(d.length / 2)] : 0;
  }

  function columns(s, spec) {
    var t = [], cols = spec.fields.map(function () { return []; }), points = 0;
    var typical = s.duration_s ? 0 : spacing(s);
    for (var i = 0; i < s.time.length; i++) {
      if (i > 0) {  // a pause in reporting (offline, restarted) shows as a gap, not as a straight line
        var every = s.duration_s ? Math.max(s.step || 0, s.duration_s[i] || 0, s.duration_s[i - 1] || 0)
                                 : Math.max(s.step || 0, typical);
        if (every > 0 && s.time[i] - s.time[i - 1] > 3 * every) {
          t.push(s.time[i - 1] + every);
          cols.forEach(function (c) { c.push(null); });
        }
      }
      t.push(s.time[i]);
      var any = false;
      spec.fields.forEach(function (f, k) {
        var v = s[f[0]][i];
        v = v === null || v === undefined ? null : v * f[2];
        cols[k].push(v);
        if (v !== null) any = true;
      });
      if (any) points++;
    }
    return {data: [t].concat(cols), points: points};
  }

  function axisValue(digits, trim) {  // trim: no trailing zeros (a PSI axis reads 0, 0.05, 5, not 5.000)
    return function (u, vals) {
      return vals.map(function (v) {
        if (v === null) return "";
        if (Math.abs(v) >= 10000) return (v / 1000).toFixed(0) + "k";
        var text = v.toFixed(Math.abs(v) < 10 ? digits : 0);
        return trim ? String(parseFloat(text)) : text;
      });
    };
  }

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  function timeValue(u, splits, axis, space, incr) {  // one short line: the browser's local time
    return splits.map(function (t) {
      var d = new Date(t * 1000), hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
      if (incr < 60) return hm + ":" + pad(d.getSeconds());
      if (incr < 86400) return hm;
      return (d.getMonth() + 1) + "/" + d.getDate();
    });
  }

  function makeChart(plot, spec, data) {
    var grid = {stroke: "#eef0f3", width: 1};
    var opts = {
      width: Math.max(240, plot.clientWidth),
      height: 200,
      scales: {x: {time: true}, y: spec.free ? {} : {range: function (u, min, max) {
        if (spec.percent) return [0, 100];
        return [0, Math.max(spec.floor || 0, max > 0 ? max * 1.15 : 1)];
      }}},
      series: [{}].concat(spec.fields.map(function (f) {
        // quality windows may stand alone between windows without the figure: marks keep them visible
        return {label: f[1], stroke: f[3], width: 1.6, spanGaps: false,
                points: spec.marks ? {show: true, size: 5, fill: f[3]} : {show: false},
                fill: spec.fields.length === 1 ? f[3] + "1f" : undefined,
                value: function (u, v) { return v === null ? "–" : v.toFixed(spec.digits); }};
      })),
      axes: [{stroke: "#6b7685", grid: grid, ticks: grid, values: timeValue, space: 60, size: 32},
             {stroke: "#6b7685", grid: grid, ticks: grid, size: 52, values: axisValue(spec.digits, spec.trim)}],
      cursor: {drag: {x: true, y: false}},
      legend: {live: true},
      hooks: {draw: [function (u) { drawLines(u, spec.lines || []); }]}
    };
    return new uPlot(opts, data, plot);
  }

  function drawLines(u, lines) {  // dashed horizontal lines (thresholds) across the plot
    var ctx = u.ctx;
    lines.forEach(function (l) {
      var y = Math.round(u.valToPos(l[0], "y", true));
      if (y < u.bbox.top || y > u.bbox.top + u.bbox.height) return;
      ctx.save();
      ctx.strokeStyle = l[1];
      ctx.lineWidth = 1;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ctx.moveTo(u.bbox.left, y);
      ctx.lineTo(u.bbox.left + u.bbox.width, y);
      ctx.stroke();
      ctx.restore();
    });
  }

  function drawCharts(s) {
    document.querySelectorAll("figure.chart[data-chart]").forEach(function (fig) {
      var key = fig.getAttribute("data-chart"), spec = CHARTS[key];
      if (!spec) return;
      var src = spec.source ? s[spec.source] : s;
      if (!src) src = {time: [], points: 0};  // a series without such columns: nothing to draw
      var plot = fig.querySelector(".plot"), built = columns(src, spec);
      var note = fig.querySelector(".nodata");
      fig.setAttribute("data-points", String(built.points));
      if (built.points === 0) {
        var some = src.points > 0 && spec.empty;
        var text = some ? spec.empty : spec.none || "no telemetry in this range yet";
        fig.setAttribute("data-state", some ? (spec.source ? "no-data" : "no-sensor") : "empty");
        if (!note) {
          note = document.createElement("div");
          note.className = "nodata";
          fig.appendChild(note);
        }
        note.textContent = text;
        plot.style.display = "none";
        return;
      }
      if (note) note.remove();
      plot.style.display = "";
      fig.setAttribute("data-state", "drawn");
      if (charts[key]) charts[key].setData(built.data);
      else charts[key] = makeChart(plot, spec, built.data);
    });
  }

  function refreshCharts() {
    var root = document.getElementById("charts");
    if (!root || typeof uPlot === "undefined") return Promise.resolve();
    return fetch(root.getAttribute("data-src"), {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("series answered " + r.status);
      return r.json();
    }).then(drawCharts);
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (key) {
      var plot = charts[key].root.parentNode;
      if (plot.clientWidth) charts[key].setSize({width: plot.clientWidth, height: 200});
    });
  });

  // -- the beat ----------------------------------------------------------------------------------
  var busy = false;
  function tick(first) {
    if (busy || (!first && document.hidden)) return;
    busy = true;
    var work = first ? [refreshCharts()] : [refreshRegions(), refreshCharts()];
    Promise.all(work).then(function () { mark(true); }, function () { mark(false); })
      .then(function () { busy = false; });
  }
  tick(true);
  setInterval(tick, REFRESH_MS);
})();
