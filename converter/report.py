"""The converter's report, three ways: a terminal table, JSON (the dict itself) and a self-contained
HTML page with a latency-vs-accuracy plot (inline SVG: no scripts, no network)."""

from __future__ import annotations

import html
import math

from converter.measure import SQNR_CAP_DB as SQNR_CAP

COLOURS = {"cpu": "#1f77b4", "intel": "#2ca02c", "arm": "#d62728"}


def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _db(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _confident(e: dict) -> str:
    n = e.get("confident_samples")
    return "-" if n is None else f"{_pct(e.get('top1_confident'))} of {n}"


# the columns each output kind shows: (header, value from an output's agreement entry)
COLUMNS = {
    "classifier": [("top-1", lambda e: _pct(e.get("top1"))), ("top-5", lambda e: _pct(e.get("top5"))),
                   ("KL", lambda e: _num(e.get("kl"), ".2e")), ("top-1 if confident", _confident)],
    "dense": [("SQNR dB", lambda e: _db(e.get("sqnr_db"))), ("rel L2", lambda e: _num(e.get("rel_l2"), ".2e"))],
}
UNITS = {"top1": _pct, "top5": _pct, "accuracy": _pct, "kl": lambda x: _num(x, ".2e"),
         "sqnr": lambda x: f"{_db(x)} dB"}


def gated_by(v: dict) -> str:
    """Which metric gated the variant and its value, e.g. ``top1 95.0%`` or ``sqnr 41.2 dB``."""
    g = v["gate"]
    return f"{g['metric']} {UNITS[g['metric']](g['value'])}"


def _gate(v: dict) -> str:
    passed = v["gate"]["passed"]
    return "-" if passed is None else ("pass" if passed else "REFUSED")


def rows(report: dict) -> list[tuple[str, ...]]:
    """The summary table: one row a variant, the metric columns of the gated output's kind."""
    ref = report["reference_latency_ms"]
    rule = report.get("gate", {})
    kind, output = rule.get("kind", "dense"), rule.get("output")
    columns = COLUMNS[kind]
    ref_acc = report.get("reference_accuracy")
    acc = [] if ref_acc is None else ["accuracy"]
    judged = ["judged on"] if "arm_check" in report else []  # which kernels computed the fidelity columns
    out = [("target", "variant", "runtime", "precision", "size", "p50 ms", "p95 ms", "speedup",
            *(h for h, _ in columns), *acc, "max abs err", "gated by", "gate", *judged)]
    r = reference(report)
    out.append((r["row"], r["label"], r["runtime"], r["precision"], size(r["size_bytes"]), f"{ref['p50']:.2f}",
                f"{ref['p95']:.2f}", "1.00x", *("ref" for _ in columns), *(_pct(ref_acc) for _ in acc), "ref", "",
                "", *("" for _ in judged)))
    for v in report["variants"] + report.get("refused", []):
        lat = v["latency_ms"]
        e = v["agreement"]["outputs"][output or v["agreement"]["output"]]
        out.append((v["target"], v["variant"], v["runtime"], v["precision"], size(v["size_bytes"]),
                    f"{lat['p50']:.2f}", f"{lat['p95']:.2f}",
                    f"{v['speedup_vs_fp32']:.2f}x" if v["speedup_vs_fp32"] else "-", *(f(e) for _, f in columns),
                    *(_pct(v.get("accuracy")) for _ in acc), _num(e.get("max_abs_err")), gated_by(v), _gate(v),
                    *(v.get("judged_on", "-") for _ in judged)))
    return out


def gate_line(report: dict) -> str:
    """What the gate judged: ``gate: top-1 agreement of output 'probs' (default for a classifier output), ...``."""
    g = report.get("gate", {})
    if "metric" not in g:
        return ""
    return (f"gate: {g['metric_name']} ({g['metric']}) of output {g['output']!r}, a {g['kind']} output; "
            f"{g['chosen_by']}; {g['limit']}")


def output_rows(report: dict) -> list[tuple[str, ...]]:
    """Every output of every variant, every metric (the HTML report's second table)."""
    out = [("target", "variant", "output", "kind", "top-1", "top-5", "top-5 overlap", "KL", "top-1 if confident",
            "SQNR dB", "rel L2", "max abs err")]
    for v in report["variants"] + report.get("refused", []):
        for name, e in v["agreement"]["outputs"].items():
            out.append((v["target"], v["variant"], name, e["kind"], _pct(e.get("top1")), _pct(e.get("top5")),
                        _pct(e.get("top5_overlap")), _num(e.get("kl"), ".2e"), _confident(e), _db(e.get("sqnr_db")),
                        _num(e.get("rel_l2"), ".2e"), _num(e.get("max_abs_err"))))
    return out


def search_lines(report: dict) -> list[str]:
    """One line per variant whose recipe was searched: what was kept and why, each candidate's figures."""
    lines = []
    for v in report["variants"] + report.get("refused", []):
        if not (search := v.get("search")):
            continue
        cands = "; ".join(
            f"{c['candidate']}{' (kept)' if c['kept'] else ''}: {c['gate']['text']}"
            + (f", {c['relative_latency']:.2f}x the fastest's latency" if c.get("relative_latency") else "")
            + ("" if c["gate"]["passed"] is not False else ", refused")
            for c in search["candidates"])
        lines.append(f"search {v['target']}/{v['variant']}: kept {search['kept']}, {search['rule']}: {cands}")
    return lines


def reference(report: dict) -> dict:
    """What the variants were judged against: ONNX Runtime on the source model, unless the report says otherwise
    (a .tflite bundled as given: the model itself, or its --reference; converter/tflite_source.py)."""
    r = report.get("reference")
    if r is None:
        return {"row": "source", "label": "onnx", "runtime": "onnxruntime", "precision": "fp32",
                "size_bytes": report["source"]["size_bytes"], "short": "ORT fp32", "text": "ONNX Runtime fp32",
                "note": None}
    if r["kind"] == "self":
        return {"row": "source", "label": "tflite (reference: the model itself)", "runtime": r["runtime"],
                "precision": r["precision"], "size_bytes": r["size_bytes"], "short": r["short"], "text": r["text"],
                "note": r.get("note")}
    return {"row": "reference", "label": r["kind"], "runtime": r["runtime"], "precision": r["precision"],
            "size_bytes": r["size_bytes"], "short": r["short"], "text": r["text"], "note": r.get("note")}


def throughput_lines(report: dict) -> list[str]:
    """One line per bundle: inferences/s served at 1, 2, 4 client threads for each (concurrency, max_batch)
    measured, and the set-up its manifest recommends (converter/measure.py ``serving``)."""
    lines = []
    for v in report["variants"]:
        t = v.get("throughput")
        if not t:
            continue
        if "error" in t:
            lines.append(f"throughput {v['target']}/{v['variant']}: not measured ({t['error']}); it serves one "
                         f"request at a time")
            continue
        clients = "/".join(map(str, t["clients"]))
        setups = "; ".join(f"concurrency {s['concurrency']} max_batch {s['max_batch']}: "
                           + "/".join(f"{s['inferences_per_s'][str(c)]:.0f}" for c in t["clients"])
                           for s in t["setups"])
        r = t["recommended"]
        lines.append(f"throughput {v['target']}/{v['variant']} (inferences/s at {clients} clients, on this host): "
                     f"{setups}; recommended concurrency {r['concurrency']}, max_batch {r['max_batch']} "
                     f"({t['rule']})")
    return lines


def warning_lines(report: dict) -> list[str]:
    """What a target's passes warn about a variant (e.g. an int8 variant in which nothing got quantized)."""
    return [f"warning {v['target']}/{v['variant']}: {v['recipe']['warning']}"
            for v in report["variants"] + report.get("refused", []) if (v.get("recipe") or {}).get("warning")]


def arm_lines(report: dict) -> list[str]:
    """Which kernels judged the arm target's variants (issue 13), what ARM kernels changed against the host's, and
    why ARM numerics were not checked where they were not."""
    a = report.get("arm_check")
    if a is None:
        return []
    lines = [f"arm: fidelity judged on {a['judged_on']}; {a['latency']}" if a["reason"] is None else
             f"arm: fidelity judged on the {a['judged_on']}'s kernels; {a['latency']}"]
    for v in report["variants"] + report.get("refused", []):
        c, h = v.get("arm_check") or {}, v.get("host_agreement")
        if c.get("status") != "emulated" or h is None:
            continue
        g = v["agreement"]
        line = f"arm/{v['variant']} on {v['judged_on']}: {gated_by(v)}"
        if "samples" in c:
            line += (f"; top-1 {_pct(g.get('top1'))} (on the {report['host']['machine']} host: {_pct(h.get('top1'))}); "
                     f"top-1 differs from the host's on {c['top1_differs_from_host']} of {c['samples']} held-out "
                     f"samples")
        else:
            line += f"; SQNR {_db(g.get('sqnr_db'))} dB (on the host: {_db(h.get('sqnr_db'))} dB)"
        golden = (v.get("quality_profile") or {}).get("golden_from")
        if golden and golden != "fp32 reference":
            line += f"; golden outputs from {golden}"
        lines.append(line)
    lines += [f"warning: {w}" for w in a["warnings"]]
    return lines


def signature_line(report: dict) -> str:
    signed = report.get("signed")
    if signed:
        return (f"signed every bundle with release key {signed['keyid']}, serial {signed['serial']}")
    return ("not signed: devices and the controller refuse these bundles until they are signed "
            "(edgefleet sign BUNDLE --key KEY, or convert again with --sign-key KEY)")


def table(report: dict) -> str:
    r = rows(report)
    widths = [max(len(row[i]) for row in r) for i in range(len(r[0]))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in r]
    lines.insert(1, "  ".join("-" * w for w in widths))
    host = report["host"]
    isa = ", ".join(f for f in host["flags"] if "vnni" in f or "amx" in f or f in ("avx2", "asimddp", "i8mm"))
    n = report["calibration"]["held_out_samples"]
    ref = reference(report)
    lines += ["", f"latency: batch 1, 1 thread, on {host['cpu']} ({isa or host['machine']}); speedup against "
                  f"{ref['text']} in the same run; agreement with {ref['text']} on {n} held-out samples"]
    if ref["note"]:
        lines.append(ref["note"])
    if gate_line(report):
        lines.append(gate_line(report))
    if (p := report.get("pruning")) is not None:
        n = p["notes"]
        lines.append(f"pruned {p['config']['ratio']:.0%} of the channels of every safe Conv group before the targets: "
                     f"parameters {n['params']['ratio']:.2f}x, MACs {n['macs']['ratio']:.2f}x, size "
                     f"{n['size']['ratio']:.2f}x, ORT fp32 {n['latency_ms']['speedup']:.2f}x as fast; every variant "
                     f"is judged against the unpruned model")
    if (d := report.get("distillation")) is not None:
        from converter.passes.distill import render

        lines.append(render(d))
    lines += arm_lines(report) + search_lines(report) + throughput_lines(report) + warning_lines(report)
    for v in report.get("refused", []):
        lines.append(f"refused {v['target']}/{v['variant']}: {v['gate']['reason']}")
    for t, chosen in report.get("gate", {}).get("chosen", {}).items():
        lines.append(f"gate {t}: {chosen}")
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['target']}: {s['reason']}")
    for v in report["variants"]:
        lines.append(f"wrote {v['path']}  ({size(v['bundle_bytes'])}, sha256 {v['bundle_sha256'][:16]}…)")
    lines.append(f"wrote {report['out']}/report.json and report.html")
    lines.append(signature_line(report))
    return "\n".join(lines)


def _plot(report: dict, w: int = 640, h: int = 360, pad: int = 56) -> str:
    """Latency (x, log) against the gate's metric (y) for every variant; the fp32 reference as a ring (or, when
    its value is no point on the axis, as SQNR's infinity is not, a dashed line at its latency)."""
    points = [(v["latency_ms"]["p50"], v["gate"]["value"], v) for v in report["variants"] + report.get("refused", [])
              if v["gate"]["value"] is not None]
    ref = report["reference_latency_ms"]["p50"]
    metric = report.get("gate", {}).get("metric", "top1")
    ref_value = {"accuracy": report.get("reference_accuracy"), "top1": 1.0, "top5": 1.0, "kl": 0.0}.get(metric)
    xs = [p[0] for p in points] + [ref]
    ys = [p[1] for p in points] + ([] if ref_value is None else [ref_value])
    x0, x1 = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.25)
    span = (max(ys) - min(ys)) if ys else 0.0
    margin = max(span * 0.08, 0.01 if metric in ("top1", "top5", "accuracy") else 0.5 if metric == "sqnr" else 1e-4)
    y0, y1 = (min(ys) - margin, max(ys) + margin) if ys else (0.0, 1.0)
    if metric in ("top1", "top5", "accuracy"):
        y1 = min(y1, 1.005)
    if metric == "kl":
        y0 = max(y0, -margin / 4)

    def sx(x: float) -> float:
        return pad + (math.log10(x) - x0) / ((x1 - x0) or 1) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)

    g = report.get("gate", {})
    label = f"{g.get('metric_name', metric)} ({'lower' if metric == 'kl' else 'higher'} is better)"
    if metric == "sqnr":
        label = "SQNR, dB (higher is better)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafafa" stroke="#999"/>',
             f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">p50 latency, ms (log scale): left is faster</text>',
             f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">'
             f'{html.escape(label)}</text>']
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        x = 10 ** (x0 + frac * (x1 - x0))
        parts.append(f'<text x="{sx(x):.1f}" y="{h - pad + 16}" text-anchor="middle">{x:.2f}</text>')
    if g.get("threshold") is not None and y0 <= _threshold_y(g, report) <= y1:
        ty = sy(_threshold_y(g, report))
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#999" '
                     f'stroke-dasharray="2 3"/><text x="{w - pad - 4}" y="{ty - 4:.1f}" text-anchor="end" '
                     f'fill="#777">gate</text>')
    if ref_value is None:
        parts.append(f'<line x1="{sx(ref):.1f}" x2="{sx(ref):.1f}" y1="{pad}" y2="{h - pad}" stroke="#000" '
                     f'stroke-dasharray="4 3"/><text x="{sx(ref) + 4:.1f}" y="{pad + 12}">{html.escape(reference(report)["short"])} (reference)</text>')
    else:
        parts.append(f'<circle cx="{sx(ref):.1f}" cy="{sy(ref_value):.1f}" r="6" fill="none" stroke="#000"/>'
                     f'<text x="{sx(ref) + 8:.1f}" y="{sy(ref_value) - 8:.1f}">{html.escape(reference(report)["short"])} '
                     f'(reference)</text>')
    for x, y, v in points:
        colour = COLOURS.get(v["target"], "#555")
        fill = colour if v["gate"]["passed"] is not False else "#fff"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}" stroke="{colour}">'
                     f'<title>{html.escape(v["target"] + "/" + v["variant"])}</title></circle>'
                     f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}" fill="{colour}">'
                     f'{html.escape(v["target"] + "/" + v["variant"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _threshold_y(g: dict, report: dict) -> float:
    """The gate's threshold on the plot's axis: a drop is drawn below the reference value."""
    if g["metric"] in ("top1", "top5"):
        return 1.0 - g["threshold"]
    if g["metric"] == "accuracy":
        return (report.get("reference_accuracy") or 0.0) - g["threshold"]
    return g["threshold"]


def _table(r: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in r[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in r[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(report: dict) -> str:
    notes = [reference(report)["note"]] if reference(report)["note"] else []
    notes += [gate_line(report)] if gate_line(report) else []
    notes += arm_lines(report) + search_lines(report) + throughput_lines(report) + warning_lines(report)
    notes += [f"refused {v['target']}/{v['variant']}: {v['gate']['reason']}" for v in report.get("refused", [])]
    notes += [f"gate {t}: {c}" for t, c in report.get("gate", {}).get("chosen", {}).items()]
    notes += [f"skipped {s['target']}: {s['reason']}" for s in report.get("skipped", [])]
    host = report["host"]
    title = f"edgefleet convert: {report['name']} {report['version']}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:nth-child(-n+4),th{{text-align:left}}
code{{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Source <code>{html.escape(report['source']['path'])}</code> (sha256 <code>{report['source']['sha256'][:16]}…</code>);
calibration sha256 <code>{report['calibration']['sha256'][:16]}…</code>, {report['calibration']['samples']} samples,
{report['calibration']['held_out_samples']} held out. Host: {html.escape(host['cpu'])}, {host['cpus']} CPUs,
ISA {html.escape(', '.join(host['flags']))}. Latency at batch 1, 1 thread; speedup against
{html.escape(reference(report)['text'])} measured in the same run. A hollow point was refused by the gate.</p>
{_plot(report)}
{_table(rows(report))}
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
<h2>Every output</h2>
<p>Agreement with fp32 over the held-out samples. Classifier outputs: top-1 agreement; top-5 (fp32's top-1 within
the variant's top 5) and the overlap of the two top-5 sets; mean KL(fp32 || variant) of the class distributions;
top-1 agreement on the samples where fp32's top-1 probability is at least 0.9 (of how many). Every output: SQNR
over all elements (10 log10 of signal power over error power; {SQNR_CAP:g} dB means identical), relative L2 error
and max abs error.</p>
{_table(output_rows(report))}
<p>Toolchain: {html.escape(', '.join(f'{k} {v}' for k, v in report['toolchain'].items()))}</p>
</body></html>
"""
