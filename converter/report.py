"""The converter's report, three ways: a terminal table, JSON (the dict itself) and a self-contained
HTML page with a latency-vs-accuracy plot (inline SVG: no scripts, no network)."""

from __future__ import annotations

import html
import math

COLOURS = {"cpu": "#1f77b4", "intel": "#2ca02c", "arm": "#d62728"}


def size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _accuracy(v: dict) -> str:
    g = v["gate"]
    if g["metric"] == "task accuracy":
        return f"{g['value']:.1%} acc"
    if g["metric"] == "top-1 agreement":
        return f"{g['value']:.1%} top-1"
    return f"{g['value']:.4f} cos"


def _gate(v: dict) -> str:
    passed = v["gate"]["passed"]
    return "-" if passed is None else ("pass" if passed else "REFUSED")


def rows(report: dict) -> list[tuple[str, ...]]:
    ref = report["reference_latency_ms"]
    out = [("target", "variant", "runtime", "precision", "size", "p50 ms", "p95 ms", "speedup", "accuracy",
            "max abs err", "gate")]
    ref_acc = report.get("reference_accuracy")
    out.append(("source", "onnx", "onnxruntime", "fp32", size(report["source"]["size_bytes"]), f"{ref['p50']:.2f}",
                f"{ref['p95']:.2f}", "1.00x", "ref" if ref_acc is None else f"{ref_acc:.1%} acc", "ref", ""))
    for v in report["variants"] + report.get("refused", []):
        lat = v["latency_ms"]
        out.append((v["target"], v["variant"], v["runtime"], v["precision"], size(v["size_bytes"]),
                    f"{lat['p50']:.2f}", f"{lat['p95']:.2f}",
                    f"{v['speedup_vs_fp32']:.2f}x" if v["speedup_vs_fp32"] else "-", _accuracy(v),
                    f"{v['agreement']['max_abs_err']:.3g}", _gate(v)))
    return out


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
    lines += ["", f"latency: batch 1, 1 thread, on {host['cpu']} ({isa or host['machine']}); speedup against ONNX "
                  f"Runtime fp32 in the same run; accuracy on {n} held-out samples"]
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
    points = [(v["latency_ms"]["p50"], v["gate"]["value"], v) for v in report["variants"] + report.get("refused", [])]
    ref = report["reference_latency_ms"]["p50"]
    ref_value = report.get("reference_accuracy") if report.get("reference_accuracy") is not None else 1.0
    xs = [p[0] for p in points] + [ref]
    ys = [p[1] for p in points] + [ref_value]
    x0, x1 = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.25)
    y0, y1 = min(ys) - 0.02, min(1.0, max(ys) + 0.01) + 0.005

    def sx(x: float) -> float:
        return pad + (math.log10(x) - x0) / ((x1 - x0) or 1) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)

    metric = report["variants"][0]["gate"]["metric"] if report["variants"] else "accuracy"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafafa" stroke="#999"/>',
             f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">p50 latency, ms (log scale): left is faster</text>',
             f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">'
             f'{html.escape(metric)}</text>']
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>')
        x = 10 ** (x0 + frac * (x1 - x0))
        parts.append(f'<text x="{sx(x):.1f}" y="{h - pad + 16}" text-anchor="middle">{x:.2f}</text>')
    parts.append(f'<circle cx="{sx(ref):.1f}" cy="{sy(ref_value):.1f}" r="6" fill="none" stroke="#000"/>'
                 f'<text x="{sx(ref) + 8:.1f}" y="{sy(ref_value) - 8:.1f}">ORT fp32 (reference)</text>')
    for x, y, v in points:
        colour = COLOURS.get(v["target"], "#555")
        fill = colour if v["gate"]["passed"] is not False else "#fff"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}" stroke="{colour}">'
                     f'<title>{html.escape(v["target"] + "/" + v["variant"])}</title></circle>'
                     f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}" fill="{colour}">'
                     f'{html.escape(v["target"] + "/" + v["variant"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict) -> str:
    r = rows(report)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in r[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in r[1:])
    notes = [f"refused {v['target']}/{v['variant']}: {v['gate']['reason']}" for v in report.get("refused", [])]
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
ISA {html.escape(', '.join(host['flags']))}. Latency at batch 1, 1 thread; speedup against ONNX Runtime fp32
measured in the same run. A hollow point was refused by the gate.</p>
{_plot(report)}
<table><tr>{head}</tr>{body}</table>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
<p>Toolchain: {html.escape(', '.join(f'{k} {v}' for k, v in report['toolchain'].items()))}</p>
</body></html>
"""
