"""The dashboard's HTML: pure functions from data to markup (``fleet.web`` gathers the data and serves).

Plain server-rendered pages; everything shown is escaped here (the rollout and model-quality panels in
``fleet.pages_rollout`` and ``fleet.pages_quality``, passed in as markup). Regions marked ``data-live`` are swapped
in place every few seconds by ``static/edgefleet.js`` (it fetches the same page again), and the charts
draw ``/api/devices/{id}/series`` with the vendored uPlot. No CDN: the pages work offline.
"""

from __future__ import annotations

import datetime as dt
from html import escape as e
from typing import TYPE_CHECKING
from urllib.parse import quote

import msgspec

from fleet.clock import amount, describe as describe_offset
from fleet.schemas import ConverterReport

if TYPE_CHECKING:
    from fleet.aggregate import Fleet

REFRESH_MS = 5000
RANGES = ((900, "15 min"), (3600, "1 h"), (6 * 3600, "6 h"), (86400, "24 h"), (7 * 86400, "7 d"))
# the charts of a device page: (key edgefleet.js knows, title, unit)
CHARTS = (("latency", "Latency percentiles", "ms"), ("errors", "Error rate", "%"),
          ("throughput", "Inferences", "per min"), ("cpu", "CPU", "%"), ("memory", "Memory (agent RSS)", "MiB"),
          ("temperature", "Temperature", "°C"))
_GOOD = {"active", "online", "done", "completed", "passed", "succeeded", "healthy", "ok"}
_BAD = {"failed", "error", "halted", "aborted", "rolled_back", "timed_out", "stopped", "offline", "refused",
        "identity_conflict", "full", "read_only", "clock off"}
NO_WRITES = ("full", "read_only")  # storage states in which a device's state dir takes no writes
_BUSY = {"downloading", "verifying", "activating", "running", "rolling", "soaking"}


# -- formatting --------------------------------------------------------------------------------------
def fmt_num(v: float | int | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms" if v < 100 else f"{v:,.0f} ms"


def fmt_pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f} %"


def fmt_rate(v: float | None) -> str:
    """An error rate (a fraction) as a percentage."""
    if v is None:
        return "–"
    return "0 %" if v == 0 else f"{v * 100:.2f} %" if v < 0.1 else f"{v * 100:.1f} %"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_temp(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.1f} °C"


def fmt_ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "–"
    t = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return f'<time datetime="{t.isoformat()}">{t.strftime("%Y-%m-%d %H:%M:%S")} UTC</time>'


def pill(text: str | None) -> str:
    t = (text or "unknown").lower()
    cls = "good" if t in _GOOD else "bad" if t in _BAD else "busy" if t in _BUSY else "neutral"
    return f'<span class="pill {cls}">{e(text or "unknown")}</span>'


def _tags(tags: list | None) -> str:
    return "".join(f' <span class="tag">{e(str(t))}</span>' for t in tags or [])


def status_pill(online: bool) -> str:
    return pill("online" if online else "offline")


def short(sha: str | None, n: int = 12) -> str:
    return "–" if not sha else f'<code title="{e(sha)}">{e(sha[:n])}</code>'


def device_href(device_id: str) -> str:
    return "/devices/" + quote(device_id, safe="")


def _kv(pairs: list[tuple[str, str]]) -> str:
    """A definition list; values are markup already."""
    return '<dl class="kv">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><div class="label">{e(label)}</div><div class="value">{value}</div></div>'


# -- the frame ---------------------------------------------------------------------------------------
def layout(title: str, body: str, *, charts: bool = False, active: str = "", bare: bool = False) -> str:
    """A page around ``body`` (markup); ``bare``: no navigation and no script (the sign-in page)."""
    uplot_css = '<link rel="stylesheet" href="/static/uplot/uPlot.min.css">' if charts else ""
    uplot_js = '<script src="/static/uplot/uPlot.iife.min.js"></script>' if charts else ""
    nav = "".join(f'<a href="{href}"{" class=on" if key == active else ""}>{label}</a>'
                  for key, href, label in (("fleet", "/", "Fleet"), ("metrics", "/metrics", "Metrics"),
                                           ("api", "/api/openapi.json", "API")))
    top = "" if bare else f"""
  <nav>{nav}</nav>
  <span class="live" id="live-status" title="This page refreshes itself every {REFRESH_MS // 1000} s">live</span>
  <form class="signout" method="post" action="/logout"><button type="submit">Sign out</button></form>"""
    script = "" if bare else f'{uplot_js}\n<script src="/static/edgefleet.js"></script>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · edgefleet</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/edgefleet.css">
{uplot_css}
</head>
<body data-refresh-ms="{REFRESH_MS}">
<header class="top">
  <a class="brand" href="/"><span class="logo">◆</span> edgefleet</a>{top}
</header>
<main>
{body}
</main>
{script}
</body>
</html>
"""


def not_found(what: str, detail: str) -> str:
    body = f"""<section class="empty"><h1>{e(what)}</h1><p>{e(detail)}</p>
<p><a href="/">Back to the fleet</a></p></section>"""
    return layout(what, body)


# -- /: the fleet --------------------------------------------------------------------------------------
def overview(agg: "Fleet", table: list[dict], rates: dict[str, dict], rollouts: str, quality: str = "",
             nav: str = "", filters: str = "") -> str:
    """The fleet page: ``agg`` the fleet's aggregates (``fleet.aggregate.summarize``) at the top, ``table`` one page of
    health entries (``fleet.paging``) with ``nav`` (its next/previous links) and ``filters`` (the filter form), both
    markup; ``rollouts`` the rollouts panel's (``fleet.pages_rollout.rollout_list``), ``quality`` the worst devices'
    by model quality (``fleet.pages_quality.worst_panel``). Its size does not grow with the fleet."""
    a = agg.all
    cards = "".join([
        _card("Online", str(a.online), "good" if a.online else ""),
        _card("Offline", str(a.offline), "bad" if a.offline else ""),
        _card("Devices", str(a.devices)),
        _card("Inferences / min", fmt_num(a.inferences_per_min) if a.devices else "–"),
        _card("Error rate", fmt_rate(a.error_rate), "bad" if a.error_rate else ""),
    ])
    body = f"""<div id="overview" data-live>
{_conflicts(agg.conflicted, agg.conflicts)}
{_storage(agg.no_writes, agg.storage_degraded)}
{_clocks(agg.clock_off, agg.clocks_off)}
<section class="cards" id="counts" data-online="{a.online}" data-offline="{a.offline}"
 data-total="{a.devices}">{cards}</section>
<section class="panel" id="models"><h2>Models</h2>{_models(agg)}</section>
<div class="columns">
<section class="panel" id="worst-errors"><h2>Worst devices — error rate</h2>
{_worst(agg.worst_error_rate, "error")}</section>
<section class="panel" id="worst-p95"><h2>Worst devices — p95 latency</h2>{_worst(agg.worst_p95, "p95")}</section>
</div>
<section class="panel" id="devices"><div class="panel-head"><h2>Devices</h2>{filters}</div>
{_device_table(table, rates, empty=a.devices > 0)}{nav}</section>
{quality}
<section class="panel"><h2>Rollouts</h2>{rollouts}</section>
</div>"""
    return layout("Fleet", body, active="fleet")


def page_nav(prev_href: str | None, next_href: str | None, shown: int) -> str:
    """The device table's previous/next links (``fleet.paging`` cursors, already in the hrefs)."""
    links = [f'<a rel="prev" href="{e(prev_href)}">← previous</a>' if prev_href is not None else "",
             f'<a rel="next" href="{e(next_href)}">next →</a>' if next_href is not None else ""]
    return (f'<nav class="pager" data-shown="{shown}"><span class="muted">{shown} device(s) on this page</span> '
            + " ".join(x for x in links if x) + "</nav>")


def filter_form(values: dict[str, str | None], models: list[str], statuses: tuple[str, ...]) -> str:
    """The device table's filters (the listing's query parameters, as the API takes them)."""
    def select(name: str, options: list[str]) -> str:
        opts = "".join(f'<option value="{e(o)}"{" selected" if values.get(name) == o else ""}>{e(o or "none")}'
                       f'</option>' for o in options)
        return f'<select name="{name}" aria-label="{name}"><option value="">any {name}</option>{opts}</select>'

    def text(name: str, hint: str) -> str:
        return (f'<input name="{name}" placeholder="{e(hint)}" aria-label="{e(hint)}" '
                f'value="{e(values.get(name) or "")}" size="10">')
    return (f'<form class="filters" method="get" action="/">{select("status", list(statuses))}'
            f'{select("model", models)}{text("version", "version")}{text("tag", "tag")}'
            f'{text("prefix", "id starts with")}<button type="submit">Filter</button></form>')


def _models(agg: "Fleet") -> str:
    """Devices by active model and version: how many, online, their recent rate, error rate and p95."""
    if not agg.models:
        return '<p class="muted">No device yet.</p>'
    rows = []
    for (name, version), g in sorted(agg.models.items(), key=lambda kv: (-kv[1].devices, kv[0])):
        rows.append(f'<tr data-model="{e(name)}" data-version="{e(version)}"><td>{e(name or "none")}</td>'
                    f'<td>{e(version or "–")}</td><td>{g.devices}</td><td>{g.online}</td>'
                    f'<td>{fmt_num(g.inferences_per_min)}</td><td>{fmt_rate(g.error_rate)}</td>'
                    f'<td>{fmt_ms(g.p95.mean)}</td><td>{fmt_ms(g.p95.max)}</td></tr>')
    return ('<table class="grid"><thead><tr><th>Model</th><th>Version</th><th>Devices</th><th>Online</th>'
            '<th>Inf/min</th><th>Error rate</th><th>p95 mean</th><th>p95 max</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _worst(rows: list[dict], what: str) -> str:
    """The devices with the highest recent error rate (``what`` error) or latest p95 (p95)."""
    if not rows:
        return f'<p class="muted">No device reports {"errors" if what == "error" else "latency"}.</p>'
    out = []
    for h in rows:
        m = h["model"] or {}
        figure = fmt_rate(h["error_rate"]) if what == "error" else fmt_ms((h["latency_ms"] or {}).get("p95"))
        out.append(f'<tr data-worst-device="{e(h["device_id"])}"><td><a href="{e(device_href(h["device_id"]))}">'
                   f'{e(h["device_id"])}</a></td><td>{e(m.get("name") or "–")} {e(m.get("version") or "")}</td>'
                   f'<td>{figure}</td></tr>')
    return ('<table class="grid"><thead><tr><th>Device</th><th>Model</th><th>'
            + ("Error rate" if what == "error" else "p95") + "</th></tr></thead><tbody>" + "".join(out)
            + "</tbody></table>")


def _more(shown: int, total: int) -> str:
    return f'<li class="muted">and {total - shown} more</li>' if total > shown else ""


def _conflicts(rows: list[dict], total: int | None = None) -> str:
    """A loud banner for identities two devices use at once (a cloned image): their session goes back and
    forth, and what either reports is taken for the other's. ``rows``: those listed, of ``total``."""
    rows = [h for h in rows if h.get("identity_conflict")]
    total = len(rows) if total is None else total
    if not rows:
        return ""
    items = "".join(
        f'<li><a href="{e(device_href(h["device_id"]))}">{e(h["device_id"])}</a>: boot ids '
        f'{e(", ".join(h["identity_conflict"]["boot_ids"][-3:]))} alternate, '
        f'{fmt_num(h["identity_conflict"]["takeovers"])} takeover(s) since {fmt_time(h["identity_conflict"]["since"])}'
        f'</li>' for h in rows) + _more(len(rows), total)
    return (f'<section class="panel banner bad" id="conflicts" data-conflicts="{total}"><h2>Two devices, one '
            f'identity</h2><ul>{items}</ul><p>A device\'s state dir (its key and certificate) was copied to another: '
            f'revoke the identity (<code>edgefleet fleet revoke ID</code>) and enroll both devices.</p></section>')


def _storage(rows: list[dict], total: int | None = None) -> str:
    """A loud banner for devices whose state dir takes no writes (full or read-only): ``rows`` of ``total``."""
    rows = [h for h in rows if h.get("storage") in NO_WRITES]
    total = len(rows) if total is None else total
    if not rows:
        return ""
    items = "".join(
        f'<li><a href="{e(device_href(h["device_id"]))}">{e(h["device_id"])}</a>: {pill(h["storage"])} since '
        f'{fmt_time(h.get("storage_since"))}, {fmt_bytes(h.get("disk_free_bytes"))} free</li>' for h in rows
    ) + _more(len(rows), total)
    return (f'<section class="panel banner bad" id="storage" data-storage="{total}"><h2>Storage that takes no '
            f'writes</h2><ul>{items}</ul><p>The agent keeps serving the model it has loaded and keeps what it must '
            f'send until its state dir takes writes again; it cannot take a new model meanwhile. Free space on it, or '
            f'make it writable again.</p></section>')


def _clocks(rows: list[dict], total: int | None = None) -> str:
    """A banner for devices whose clock is further off than the controller's bound: ``rows`` of ``total``."""
    rows = [h for h in rows if (h.get("clock") or {}).get("exceeds_max")]
    total = len(rows) if total is None else total
    if not rows:
        return ""
    synced = {True: "its OS says synchronised", False: "its OS says not synchronised"}
    items = "".join(
        f'<li><a href="{e(device_href(h["device_id"]))}">{e(h["device_id"])}</a>: clock '
        f'{e(describe_offset(h["clock"]["offset_s"]))}'
        f'{e(" (" + synced[h["clock"]["synced"]] + ")") if h["clock"]["synced"] in synced else ""}</li>'
        for h in rows) + _more(len(rows), total)
    bound = amount(rows[0]["clock"]["max_offset_s"])
    return (f'<section class="panel banner bad" id="clocks" data-clocks="{total}"><h2>Clocks off by more than '
            f'{e(bound)}</h2><ul>{items}</ul><p>Their windows and events are filed at this controller\'s time (the '
            f'offset is estimated from their messages), so figures, charts, rollout gates and retention are right; '
            f'what the devices stamp themselves is not. Check NTP on them (<code>timedatectl</code>).</p></section>')


def _disk_cell(h: dict) -> str:
    free = fmt_bytes(h.get("disk_free_bytes"))
    return f'{pill(h["storage"])} {free}' if h.get("storage") in NO_WRITES else free


def _clock_cell(h: dict) -> str:
    c = h.get("clock") or {}
    if c.get("offset_s") is None:
        return '<span class="muted">–</span>'
    text = e(describe_offset(c["offset_s"]))
    return f'<span class="bad-text" title="beyond the bound">{text}</span>' if c.get("exceeds_max") else text


def _rates(h: dict, ours: dict) -> dict:
    """inferences/min and error rate: the health report's own when it has them (what the CLI shows), else
    ours (``fleet.series.recent_rates``)."""
    return {k: h[k] if k in h else ours.get(k) for k in ("inferences_per_min", "error_rate")}


def _device_table(health: list[dict], rates: dict[str, dict], empty: bool = False) -> str:
    """The devices' rows; none: ``empty`` says the fleet has devices, just none that the filters keep."""
    if not health and empty:
        return '<p class="muted" id="no-match">No device matches these filters.</p>'
    if not health:
        return ('<p class="muted">No device has reported yet. Point an agent at this controller\'s broker '
                '(<code>edgefleet agent run</code>) and it registers itself.</p>')
    head = ("Status", "Device", "Model", "Version", "Precision", "Inf/min", "Error rate", "p50", "p95", "p99",
            "CPU", "Memory", "Temp", "Disk free", "Clock", "Last seen")
    rows = []
    for h in health:
        m = h["model"] or {}
        r = _rates(h, rates.get(h["device_id"], {}))
        lat = h["latency_ms"] or {}
        mem = fmt_bytes(h["rss_bytes"])
        if h["memory_percent"] is not None:
            mem += f' <span class="muted">({h["memory_percent"]:.0f} %)</span>'
        rate = r.get("error_rate")
        cells = [
            status_pill(h["online"]),
            f'<a href="{e(device_href(h["device_id"]))}">{e(h["device_id"])}</a>{_tags(h.get("tags"))}',
            e(m.get("name") or "–"), e(m.get("version") or "–"), e(m.get("precision") or "–"),
            fmt_num(r.get("inferences_per_min")),
            f'<span class="{"bad-text" if rate else ""}">{fmt_rate(rate)}</span>',
            fmt_ms(lat.get("p50")), fmt_ms(lat.get("p95")), fmt_ms(lat.get("p99")),
            fmt_pct(h["cpu_percent"]), mem,
            f'<span class="{"muted" if h["temperature_c"] is None else ""}">{fmt_temp(h["temperature_c"])}</span>',
            _disk_cell(h), _clock_cell(h),
            f'<span title="{e(str(h["last_seen"]))}">{fmt_ago(h["last_seen_ago_s"])}</span>',
        ]
        rows.append(f'<tr data-device="{e(h["device_id"])}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<table class="grid devices"><thead><tr>' + "".join(f"<th>{e(x)}</th>" for x in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


# -- /devices/{id} ---------------------------------------------------------------------------------------
def device(detail: dict, info: dict, rates: dict, bundle: dict | None, history_bundles: dict[str, dict],
           since: int, quality: str = "") -> str:
    """A device's page; ``quality`` is its model-quality section's markup (``fleet.pages_quality.device_section``),
    shown under the telemetry charts."""
    d = detail
    rates = _rates(d, rates)
    m = d["model"] or {}
    lat = d["latency_ms"] or {}
    model = (f'{e(m["name"])} {e(m["version"])} <span class="muted">{e(m["precision"])} · {e(m["runtime"])}</span>'
             if m else "none")
    cards = "".join([
        _card("Inferences / min", fmt_num(rates.get("inferences_per_min"))),
        _card("Error rate", fmt_rate(rates.get("error_rate")), "bad" if rates.get("error_rate") else ""),
        _card("p50 / p95 / p99", f'{fmt_ms(lat.get("p50"))} <span class="muted">/</span> {fmt_ms(lat.get("p95"))} '
                                 f'<span class="muted">/</span> {fmt_ms(lat.get("p99"))}', "wide"),
        _card("CPU", fmt_pct(d["cpu_percent"])),
        _card("Memory", fmt_bytes(d["rss_bytes"]) + (f' <span class="muted">{d["memory_percent"]:.0f} %</span>'
                                                     if d["memory_percent"] is not None else "")),
        _card("Temperature", fmt_temp(d["temperature_c"])),
        _card("Disk free", _disk_cell(d), "bad" if d.get("storage") in NO_WRITES else ""),
        _card("Clock", _clock_cell(d), "bad" if (d.get("clock") or {}).get("exceeds_max") else ""),
    ])
    head = f"""<div id="device-head" data-live>
{_conflicts([d])}
{_storage([d])}
{_clocks([d])}
<section class="titlebar"><h1>{e(d["device_id"])}</h1>{status_pill(d["online"])}{_tags(d.get("tags"))}
<span class="muted">model</span> <span class="model">{model}</span>
<span class="muted">last seen {fmt_ago(d["last_seen_ago_s"])}</span></section>
<section class="cards">{cards}</section>
</div>"""
    ranges = "".join(f'<a href="?since={s}"{" class=on" if s == since else ""}>{label}</a>' for s, label in RANGES)
    src = f"/api/devices/{quote(d['device_id'], safe='')}/series?since={since}"
    figures = "".join(
        f'<figure class="chart" data-chart="{key}" data-points="0"><figcaption>{e(title)} '
        f'<span class="unit">{e(unit)}</span></figcaption><div class="plot"></div></figure>'
        for key, title, unit in CHARTS)
    charts = f"""<section class="panel"><div class="panel-head"><h2>Over time</h2><nav class="range">{ranges}</nav></div>
<div class="charts" id="charts" data-src="{e(src)}">{figures}</div>
<noscript><p class="muted">The charts need JavaScript; the figures above are the latest window.</p></noscript>
</section>"""
    tail = f"""<div id="device-tail" data-live>
<div class="columns">
<section class="panel"><h2>Active model</h2>{_active_model(d, bundle)}</section>
<section class="panel"><h2>Device</h2>{_device_info(d, info)}</section>
</div>
<section class="panel"><h2>Recent events</h2>{_events(d["events"])}</section>
{_history(d)}
<section class="panel"><h2>Deployments</h2>{_deployments(d["deployments"], history_bundles)}</section>
</div>"""
    return layout(d["device_id"], head + charts + quality + tail, charts=True)


def _active_model(d: dict, bundle: dict | None) -> str:
    m = d["model"]
    if not m:
        return '<p class="muted">No model is active on this device.</p>'
    pairs = [("Model", f'{e(m["name"])} {e(m["version"])}'), ("Precision", e(m["precision"])),
             ("Runtime", e(m["runtime"])), ("Runs on", _serving(d.get("serving"))), ("Bundle", short(m["sha256"]))]
    sg = d.get("signer")
    if sg is not None:
        who = ("unsigned" if sg["keyid"] is None else
               f'{e(sg["name"] or "unknown key")} <code>{e(sg["keyid"])}</code>'
               + (' <span class="muted">(removed since)</span>' if sg["removed"] else ""))
        pairs.append(("Signed by", f'<span data-signer="{e(sg["keyid"] or "")}">{who}</span>'))
        pairs.append(("Serial", e(str(sg["serial"])) if sg["serial"] else "-"))
    if d.get("deployment"):
        pairs.append(("Deployment", f'{e(d["deployment"]["deployment_id"])} {pill(d["deployment"]["phase"])}'))
    out = _kv(pairs)
    if bundle is None:
        return out + '<p class="muted">This bundle was not uploaded to this controller: no converter report.</p>'
    manifest = bundle["manifest"]
    out += '<h3>Converter report</h3>'
    if not manifest.get("report"):
        return out + (f'<p class="muted">Bundle of {fmt_bytes(bundle["size"])}, target {e(str(manifest["target"]))}; '
                      'it carries no converter report (not built by <code>edgefleet convert</code>).</p>')
    try:  # what the report says is the bundle's maker's: shown through its schema, each field typed
        report = msgspec.convert(manifest["report"], ConverterReport)
    except msgspec.ValidationError as err:
        return out + f'<p class="bad-text">Converter report unreadable: {e(str(err))}.</p>'
    lat, agree, gate, host = report.latency_ms, report.agreement, report.gate, report.host
    rows = [("Variant", e(f'{report.target or manifest["target"]} / {report.variant or "–"}')),
            ("Size", f'{fmt_bytes(report.size_bytes)} <span class="muted">(bundle '
                     f'{fmt_bytes(bundle["size"])})</span>')]
    if lat:
        threads = lat.settings.intra_op_threads if lat.settings else None
        rows.append(("Latency", f'p50 {fmt_ms(lat.p50)}, p95 {fmt_ms(lat.p95)} '
                                f'<span class="muted">batch {e(str(lat.batch))}'
                                f'{e(f", {threads} thread(s)") if threads else ""}</span>'))
    if report.speedup_vs_fp32 is not None:
        rows.append(("Speed-up vs fp32", f'{report.speedup_vs_fp32:.2f}×'))
    if agree:
        bits = []
        if agree.top1 is not None:
            bits.append(f'top-1 {agree.top1 * 100:.1f} %')
        if agree.top5 is not None:
            bits.append(f'top-5 {agree.top5 * 100:.1f} %')
        if agree.kl is not None:
            bits.append(f'KL {agree.kl:.3g}')
        if agree.sqnr_db is not None:
            bits.append(f'SQNR {agree.sqnr_db:.1f} dB')
        if agree.min_cosine is not None:
            bits.append(f'min cosine {agree.min_cosine:.4f}')
        if agree.max_abs_err is not None:
            bits.append(f'max abs err {agree.max_abs_err:.3g}')
        samples = "?" if agree.samples is None else agree.samples
        rows.append(("Agreement", e(", ".join(bits)) + f' <span class="muted">on {e(str(samples))}'
                                                      ' held-out samples</span>'))
    if report.accuracy is not None:
        rows.append(("Task accuracy", f'{report.accuracy * 100:.1f} %'))
    if gate:
        verdict = {True: "passed", False: "refused"}.get(gate.passed, "not gated")
        rows.append(("Gate", f'{pill(verdict)} {e(gate.reason)}'))
    if host:
        rows.append(("Measured on", e(f'{host.cpu}, {"?" if host.cpus is None else host.cpus} CPUs, '
                                      f'{host.machine}')))
    return out + _kv(rows)


def _history(d: dict) -> str:
    """Online/offline transitions and errors by kind, when the health report has them."""
    panels = []
    if isinstance(d.get("transitions"), list):
        rows = "".join(f'<tr><td>{fmt_time(t.get("time"))}</td><td>{status_pill(bool(t.get("online")))}</td>'
                       f'<td class="reason">{e(str(t.get("reason") or ""))}</td></tr>' for t in d["transitions"])
        panels.append('<section class="panel"><h2>Online / offline</h2>' + (
            '<table class="grid"><thead><tr><th>Since</th><th>Status</th><th>Why</th></tr></thead><tbody>'
            + rows + "</tbody></table>" if rows else '<p class="muted">No transitions recorded.</p>') + "</section>")
    if isinstance(d.get("errors_by_kind"), dict):
        rows = "".join(f'<tr><td><code>{e(str(k))}</code></td><td>{fmt_num(v.get("count"))}</td>'
                       f'<td>{fmt_time(v.get("last_time"))}</td></tr>'
                       for k, v in d["errors_by_kind"].items() if isinstance(v, dict))
        panels.append('<section class="panel"><h2>Errors by kind</h2>' + (
            '<table class="grid"><thead><tr><th>Kind</th><th>Count</th><th>Last</th></tr></thead><tbody>'
            + rows + "</tbody></table>" if rows else '<p class="muted">No errors reported.</p>') + "</section>")
    return f'<div class="columns">{"".join(panels)}</div>' if panels else ""


def _device_info(d: dict, info: dict) -> str:
    info = {**info, **(d.get("identity") or {})}
    interval = info.get("interval_s")
    return _kv([
        ("Status", f'{status_pill(d["online"])} <span class="muted">last seen {fmt_time(d["last_seen"])}</span>'),
        ("First seen", fmt_time(info.get("first_seen"))),
        ("Agent", e(info.get("agent_version") or "–")),
        ("Arch", e(info.get("arch") or "–")),
        ("Runtimes", e(", ".join(info.get("runtimes") or []) or "–")),
        ("Runtime devices", e("; ".join(f"{rt}: {', '.join(ds) or '–'}" for rt, ds in info["devices"].items()))
         if info.get("devices") else '<span class="muted">not reported</span>'),
        ("Accelerators", _accelerators(d.get("accelerators"))),
        ("Boot", short(info.get("boot_id"), 8)),
        ("Reporting every", f"{interval:g} s" if interval else "–"),
        ("Storage", f'{pill(d.get("storage") or "not reported")} {fmt_bytes(d.get("disk_free_bytes"))} free'
                    + (f' <span class="muted">since {fmt_time(d.get("storage_since"))}</span>'
                       if d.get("storage") in NO_WRITES else "")),
        ("Clock", _clock_info(d.get("clock") or {})),
        ("Totals", f'{fmt_num(d["inferences"])} inferences, {fmt_num(d["errors"])} errors'),
        ("Messages", f'{d["seq_gaps"]} lost (seq gaps), {d["duplicates"]} duplicates; outbox '
                     f'{fmt_num(d["outbox_pending"])} pending, {fmt_num(d["outbox_dropped"])} dropped'),
    ])


def _serving(sv: dict | None) -> str:
    """What really runs the active model (its state's ``serving``), and why not the bundle's first choice."""
    if not sv:
        return '<span class="muted">not reported</span>'
    why = f' <span class="muted">(fallback: {e(sv["fallback"])})</span>' if sv.get("fallback") else ""
    return f'<span data-serving="{e(sv["device"])}">{e(sv["device"])} via {e(sv["provider"])}</span>{why}'


def _accelerators(acc: list | None) -> str:
    """Each accelerator and its load in the latest window; what the machine does not say is "unknown"."""
    if acc is None:
        return '<span class="muted">not reported</span>'
    if not acc:
        return "none"

    def one(a: dict) -> str:
        util = "unknown" if a["utilization_percent"] is None else f'{a["utilization_percent"]:g} %'
        used, total = a["memory_used_bytes"], a["memory_total_bytes"]
        memory = ("" if used is None and total is None else
                  f', memory {"unknown" if used is None else fmt_bytes(used)} of '
                  f'{"unknown" if total is None else fmt_bytes(total)}')
        return (f'<div data-accelerator="{e(a["name"])}">{e(a["name"])} <span class="muted">{e(a["kind"])} '
                f'{e(a["driver"])}</span> load {e(util)}{e(memory)}</div>')
    return "".join(one(a) for a in acc)


def _clock_info(c: dict) -> str:
    synced = {True: "synchronised", False: "not synchronised"}.get(c.get("synced"), "unknown")
    if c.get("offset_s") is None:
        return f'<span class="muted">offset not known yet; the OS says {synced}</span>'
    flag = f' {pill("clock off")}' if c.get("exceeds_max") else ""
    jumps = f", {c['jumps']} step(s) this boot" if c.get("jumps") else ""
    return (f'<span data-offset="{c["offset_s"]}">{e(describe_offset(c["offset_s"]))}</span>{flag} '
            f'<span class="muted">(estimated from its messages{e(jumps)}; the OS says {synced})</span>')


def _events(events: list[dict]) -> str:
    if not events:
        return '<p class="muted">No events.</p>'
    rows = "".join(
        f'<tr><td>{fmt_time(ev["time"])}</td><td>{pill(ev["kind"])}</td><td>{e(ev["version"] or "–")}</td>'
        f'<td>{e(ev["deployment_id"] or "–")}</td><td class="reason">{e(ev["reason"] or "")}</td></tr>'
        for ev in events)
    return ('<table class="grid events"><thead><tr><th>Time</th><th>Event</th><th>Version</th><th>Deployment</th>'
            '<th>Reason</th></tr></thead><tbody>' + rows + "</tbody></table>")


def _deployments(rows: list[dict], bundles: dict[str, dict]) -> str:
    if not rows:
        return '<p class="muted">No deployment from this controller yet.</p>'
    out = []
    for r in rows:
        b = bundles.get(r["bundle_sha256"]) or {}
        name, version = r.get("name") or b.get("name"), r.get("version") or b.get("version")
        what = (f'{e(name)} {e(version)} <span class="muted">{e(b.get("precision") or "")}</span>'
                if name else "")
        out.append(f'<tr><td>{fmt_time(r["created"])}</td><td>{e(r["deployment_id"])}</td>'
                   f'<td>{what} {short(r["bundle_sha256"], 8)}</td><td>{pill(r["phase"])}</td>'
                   f'<td class="reason">{e(r["reason"] or "")}</td><td>{fmt_time(r["updated"])}</td></tr>')
    return ('<table class="grid"><thead><tr><th>Created</th><th>Deployment</th><th>Bundle</th><th>Phase</th>'
            '<th>Reason</th><th>Updated</th></tr></thead><tbody>' + "".join(out) + "</tbody></table>")
