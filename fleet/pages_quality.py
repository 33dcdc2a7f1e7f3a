"""The dashboard's model-quality markup (issue 12): the fleet page's worst devices and a device page's "Model
quality" section with its charts.

Both render what ``fleet.quality`` answers (``summary`` rows, ``device``'s dict: see their docstrings) and
compute nothing of their own: PSI, Jensen-Shannon, bands, agreement, accuracy, intervals and the confusion
matrix are shown as that module gives them. Everything shown is escaped here (an output name comes from a
bundle's profile.json, whoever built it). The charts are figures ``static/edgefleet.js`` draws from the
columns ``Series.quality`` carries (``fleet.series.quality_series``).
"""

from __future__ import annotations

from html import escape as e
from typing import Any

from fleet.pages import RANGES, _kv, device_href, fmt_num, fmt_time, short

# the charts of a device's quality (key edgefleet.js knows, title, unit)
CHARTS = (("psi", "Drift: PSI vs reference", "per window"), ("canary", "Canary agreement", "%"),
          ("accuracy", "Feedback accuracy", "%"))
_BAND_CLASS = {"stable": "good", "moderate": "warn", "significant": "bad"}  # agent.quality.psi_band's names


# -- formatting --------------------------------------------------------------------------------------
def fmt_psi(v: float | None) -> str:
    """A PSI or a Jensen-Shannon divergence (bits)."""
    return "–" if v is None else f"{v:.3f}"


def fmt_share(v: float | None) -> str:
    """A proportion (agreement, accuracy, precision...) as a percentage."""
    return "–" if v is None else f"{v * 100:.1f} %"


def fmt_interval(iv: list[float] | None) -> str:
    """A 95 % Wilson interval, as percentages."""
    if not iv:
        return ""
    return (f' <span class="muted interval" title="95 % Wilson interval">'
            f'[{iv[0] * 100:.1f}–{iv[1] * 100:.1f} %]</span>')


def band_pill(band: str | None) -> str:
    """A drift band as a pill: stable good, moderate a warning, significant bad, "too few" neutral."""
    text = band or "too few"
    return f'<span class="pill {_BAND_CLASS.get(text, "neutral")}" data-band="{e(text)}">{e(text)}</span>'


def range_label(seconds: float) -> str:
    return next((label for s, label in RANGES if s == seconds), f"{seconds:g} s")


def _where(worst: dict | None) -> str:
    if not worst:
        return "–"
    return f'<code>{e(str(worst.get("output")))}</code> · {e(str(worst.get("feature")))}'


def _table(head: tuple[str, ...], rows: list[str], cls: str = "grid") -> str:
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


# -- /: the worst devices ----------------------------------------------------------------------------
def worst_panel(rows: list[dict[str, Any]], limit: int | None, window_s: float) -> str:
    """The fleet page's panel from ``fleet.quality.summary`` rows (worst first): at most ``limit`` rows (None:
    all), with a link to the rest. A significant drift (vs the reference or the fleet) marks the row."""
    title = (f'<h2>Model quality — worst devices <span class="muted">last {e(range_label(window_s))}</span></h2>')
    if not rows:
        return (f'<section class="panel" id="quality-worst" data-quality-total="0">{title}'
                f'<p class="muted">No device sent quality reports in the last {e(range_label(window_s))}.</p>'
                f'</section>')
    shown = rows if limit is None else rows[:limit]
    out = []
    for r in shown:
        drifting = r["band"] == "significant"
        canary = ("–" if r["canary_agreement"] is None else
                  f'{fmt_share(r["canary_agreement"])} <span class="muted">{fmt_num(r["canary_runs"])} runs</span>')
        accuracy = ("–" if r["accuracy"] is None else
                    f'{fmt_share(r["accuracy"])} <span class="muted">{fmt_num(r["labels"])} labels</span>')
        cells = [
            f'<a href="{e(device_href(r["device_id"]))}">{e(r["device_id"])}</a>',
            f'{e(r["version"] or "–")} {short(r["sha256"], 8)}',
            fmt_num(r["served"]),
            f'<span class="psi">{fmt_psi(r["psi_ref"])}</span> {band_pill(r["band_ref"])}',
            f'<span class="psi">{fmt_psi(r["psi_fleet"])}</span> {band_pill(r["band_fleet"])}',
            canary, accuracy]
        out.append(f'<tr data-quality-device="{e(r["device_id"])}" data-band="{e(r["band"])}"'
                   f'{" class=drifting" if drifting else ""}>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    more = ""
    if limit is not None and len(rows) > limit:
        more = (f'<p class="more"><a href="/?quality=all">All {len(rows)} devices</a> '
                f'<span class="muted">({len(rows) - limit} more)</span></p>')
    elif limit is None and rows:
        more = '<p class="more"><a href="/">Only the worst ten</a></p>'
    drifting = sum(1 for r in rows if r["band"] == "significant")
    return (f'<section class="panel" id="quality-worst" data-quality-total="{len(rows)}" '
            f'data-quality-shown="{len(shown)}" data-drifting="{drifting}">{title}'
            + _table(("Device", "Version", "Outputs", "PSI vs reference", "PSI vs fleet", "Canary agreement",
                      "Accuracy"), out, "grid quality-worst")
            + more + "</section>")


# -- /devices/{id}: the model quality section --------------------------------------------------------
def device_section(q: dict[str, Any], since: float) -> str:
    """A device page's "Model quality" section from ``fleet.quality.device`` over the page's range (plus
    ``ever``: whether the device ever sent quality). The figures are a live region; the charts are not (the
    script redraws them in place)."""
    label = range_label(since)
    head = (f'<div class="panel-head"><h2>Model quality</h2><span class="muted">over the last {e(label)}'
            f'</span></div>')
    if not q.get("sha256"):
        note = (f"No quality reports in the last {label}." if q.get("ever") else
                "No quality reports yet.")
        return (f'<section class="panel" id="quality"><div id="quality-figures" data-live>'
                f'{head}<p class="muted" id="quality-none">{e(note)}</p></div></section>')
    figures = "".join(
        f'<figure class="chart" data-chart="{key}" data-points="0"><figcaption>{e(title)} '
        f'<span class="unit">{e(unit)}</span></figcaption><div class="plot"></div></figure>'
        for key, title, unit in CHARTS)
    return (f'<section class="panel" id="quality"><div id="quality-figures" data-live>{head}{_figures(q)}</div>'
            f'<h3>Over time</h3><div class="charts quality-charts">{figures}</div></section>')


def _figures(q: dict[str, Any]) -> str:
    others = [v for v in q["versions"] if v["sha256"] != q["sha256"]]
    also = ("; also reported on " + ", ".join(
        f'{e(v["version"])} {short(v["sha256"], 8)} <span class="muted">({fmt_num(v["windows"])} windows)</span>'
        for v in others)) if others else ""
    intro = (f'<p class="quality-intro" data-sha="{e(q["sha256"])}">Version {e(q["version"] or "–")} '
             f'{short(q["sha256"], 12)}: {fmt_num(q["windows"])} windows, {fmt_num(q["served"])} outputs served, '
             f'the last {fmt_time(q["last"])}{also}.</p>')
    if q["drift"] is None:  # the bundle has no reference profile on this controller
        return (intro + '<p class="muted">This controller has no reference profile for the bundle: no drift or '
                        'feedback figures.</p>' + '<h3>Canary</h3>' + _canary(q["canary"]))
    return (intro + '<h3>Drift</h3>' + _drift(q["drift"], q["min_served"])
            + '<div class="columns"><div><h3>Canary</h3>' + _canary(q["canary"]) + '</div>'
            + '<div><h3>Refused feedback</h3>' + _refused(q["refused"]) + '</div></div>'
            + '<h3>Feedback</h3>' + _feedback(q["feedback"]))


def _drift(drift: dict[str, Any], min_served: int) -> str:
    ref, fleet = drift["reference"], drift["fleet"]

    def compared(d: dict, what: str, gated: bool) -> str:
        """How many outputs each side holds; fleet.quality judges neither side below min_served, except the
        reference, which it judges whatever its size (a small one is said here: its PSI is noisy)."""
        if d["served"] < min_served:
            return f'{fmt_num(d["served"])} served <span class="muted">(fewer than {min_served}: not judged)</span>'
        text = f'{fmt_num(d["served"])} served vs {fmt_num(d["expected_served"] or 0)} {what}'
        if (d["expected_served"] or 0) < min_served:
            text += (f' <span class="muted">(fewer than {min_served}: not judged)</span>' if gated else
                     ' <span class="muted small-reference">(a small reference: its PSI is noisy)</span>')
        return text

    n = fleet["devices"]
    rows = [
        ("reference", "vs reference", ref, compared(ref, "reference samples", False)),
        ("fleet", "vs fleet", fleet,
         compared(fleet, f'from {n} other device{"s" if n != 1 else ""}', True) if n else
         '<span class="muted">no other device reported on this bundle</span>')]
    out = [f'<tr data-drift="{key}" data-band="{e(d["band"])}"><th>{e(title)}</th>'
           f'<td class="psi">{fmt_psi(d["psi"])}</td><td class="js">{fmt_psi(d["js"])}</td>'
           f'<td>{band_pill(d["band"])}</td><td>{_where(d["worst"])}</td><td>{how}</td></tr>'
           for key, title, d, how in rows]
    table = _table(("", "PSI", "JS (bits)", "Band", "Worst output · feature", "Outputs compared"), out,
                   "grid quality-drift")
    features: dict[tuple[str, str], dict[str, Any]] = {}
    for key, d in (("ref", ref), ("fleet", fleet)):
        for f in d["features"]:
            features.setdefault((f["output"], f["feature"]), {})[key] = f
    if not features:
        return table
    frows = []
    for (output, feature), by in features.items():
        r, f = by.get("ref") or {}, by.get("fleet") or {}
        frows.append(f'<tr><td><code>{e(str(output))}</code></td><td>{e(str(feature))}</td>'
                     f'<td>{fmt_psi(r.get("psi"))} {band_pill(r.get("band")) if r else ""}</td>'
                     f'<td>{fmt_psi(r.get("js"))}</td>'
                     f'<td>{fmt_psi(f.get("psi"))} {band_pill(f.get("band")) if f else ""}</td>'
                     f'<td>{fmt_psi(f.get("js"))}</td></tr>')
    return table + ('<details class="features"><summary>Per output and feature</summary>'
                    + _table(("Output", "Feature", "PSI vs reference", "JS vs reference", "PSI vs fleet",
                              "JS vs fleet"), frows) + '</details>')


def _canary(c: dict[str, Any]) -> str:
    if not c["runs"]:
        return '<p class="muted">No canary run in this range.</p>'
    err = "–" if c["max_abs_err"] is None else f'{c["max_abs_err"]:.3g}'
    return ('<div class="canary">' + _kv([
        ("Agreement", f'<span class="share" data-agreement="{c["agreement"]}">{fmt_share(c["agreement"])}</span>'
                      f'{fmt_interval(c["interval"])}'),
        ("Runs", f'{fmt_num(c["agree"])} of {fmt_num(c["runs"])} agree with fp32'),
        ("Max abs error", err),
        ("Last run", fmt_time(c["last_time"]))]) + '</div>')


def _refused(refused: dict[str, int]) -> str:
    if not refused:
        return '<p class="muted">None.</p>'
    rows = [f'<tr><td><code>{e(str(reason))}</code></td><td>{fmt_num(n)}</td></tr>'
            for reason, n in sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _table(("Reason", "Labels"), rows, "grid quality-refused")


def _feedback(fb: dict[str, Any] | None) -> str:
    if fb is None:
        return '<p class="muted">No feedback figures.</p>'
    if not fb["classes"]:
        return ('<p class="muted">The bundle\'s profile has no classifier output: no accuracy or confusion '
                f'matrix ({fmt_num(fb["labels"])} labels).</p>')
    if not fb["scored"]:
        return '<p class="muted">No feedback labels in this range.</p>'
    macro = fb["macro"]
    summary = _kv([
        ("Accuracy", f'<span class="share" data-accuracy="{fb["accuracy"]}">{fmt_share(fb["accuracy"])}</span>'
                     f'{fmt_interval(fb["accuracy_interval"])} <span class="muted">on {fmt_num(fb["scored"])} '
                     f'labels</span>'),
        ("Macro precision / recall / F1",
         f'{fmt_share(macro["precision"])} <span class="muted">/</span> {fmt_share(macro["recall"])} '
         f'<span class="muted">/</span> {fmt_share(macro["f1"])}')])
    per_class = [
        f'<tr data-class="{e(str(c["class"]))}"><th>{e(str(c["class"]))}</th><td>{fmt_num(c["support"])}</td>'
        f'<td>{fmt_num(c["predicted"])}</td><td>{fmt_share(c["precision"])}{fmt_interval(c["precision_interval"])}'
        f'</td><td>{fmt_share(c["recall"])}{fmt_interval(c["recall_interval"])}</td><td>{fmt_share(c["f1"])}</td>'
        f'</tr>' for c in fb["per_class"]]
    return ('<div class="columns"><div>' + summary
            + _table(("Class", "Labels (true)", "Predicted", "Precision", "Recall", "F1"), per_class,
                     "grid quality-classes")
            + '</div><div>' + confusion_table(fb["classes"], fb["confusion"]) + '</div></div>')


def confusion_table(classes: list[Any], matrix: list[list[int]]) -> str:
    """The confusion matrix: true class in rows, prediction in columns, both in the profile's class order then
    "other"; a cell's shade is its count against the largest cell (the diagonal green, the rest red)."""
    top = max((n for row in matrix for n in row), default=0)
    head = "".join(f'<th scope="col">{e(str(c))}</th>' for c in classes)
    rows = []
    for i, (c, row) in enumerate(zip(classes, matrix)):
        cells = []
        for j, n in enumerate(row):
            level = 0 if not n or not top else 1 + min(3, int(4 * n / top - 1e-9))
            cls = ("diag " if i == j else "") + f"h{level}"
            cells.append(f'<td class="{cls}" data-true="{e(str(c))}" data-pred="{e(str(classes[j]))}">'
                         f'{fmt_num(n)}</td>')
        rows.append(f'<tr><th scope="row">{e(str(c))}</th>{"".join(cells)}'
                    f'<td class="total muted">{fmt_num(sum(row))}</td></tr>')
    return (f'<table class="confusion" id="confusion"><caption>Confusion matrix: true class in rows, '
            f'predicted in columns</caption><thead><tr><th class="corner">true \\ predicted</th>{head}'
            f'<th class="total muted">labels</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
