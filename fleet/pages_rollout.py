"""The dashboard's rollout markup: the fleet page's rollouts panel and ``/rollouts/{id}``.

Both render what the rollout API answers (``GET /api/rollouts``, ``GET /api/rollouts/{id}``, see
``fleet.rollout.view``): each field is read with a default, so a field the engine adds or drops shows as
"–" rather than breaking the page, and the full answer is one click away on the page.
"""

from __future__ import annotations

import json
from html import escape as e
from typing import Any
from urllib.parse import quote

from fleet.pages import _card, _kv, device_href, fmt_ms, fmt_num, fmt_rate, fmt_time, layout, pill, short

LIVE = ("running", "paused")
SHOWN = 8  # rollouts listed on the fleet page: the live ones, then the latest others


def rollout_href(rollout_id: Any) -> str:
    return "/rollouts/" + quote(str(rollout_id), safe="")


def _bundle(b: Any) -> str:
    if isinstance(b, dict):
        name = " ".join(str(b[k]) for k in ("name", "version") if b.get(k))
        return (e(name) + " " if name else "") + short(b.get("sha256"), 8)
    return short(b, 8) if isinstance(b, str) else "–"


def _phases(phases: Any) -> str:
    if not isinstance(phases, dict) or not phases:
        return "–"
    return ", ".join(f"{n} {e(str(p))}" for p, n in sorted(phases.items(), key=lambda kv: -kv[1]))


def rollout_list(status: int, data: Any) -> str:
    """The rollouts panel of the fleet page, from ``GET /api/rollouts`` (status, JSON)."""
    if status == 404:
        return '<p class="muted">This controller has no rollout engine.</p>'
    if status != 200 or not isinstance(data, list):
        why = data.get("error") if isinstance(data, dict) else None
        return f'<p class="bad-text">The rollout API answered {status}{": " + e(str(why)) if why else ""}.</p>'
    items = [r for r in data if isinstance(r, dict)]
    if not items:
        return '<p class="muted">No rollouts yet: <code>edgefleet fleet deploy BUNDLE --to TARGET --waves ' \
               '1,10%,50%,100%</code> starts one.</p>'
    live = [r for r in items if r.get("status") in LIVE]
    shown = live + [r for r in items if r.get("status") not in LIVE][: max(0, SHOWN - len(live))]
    rows = []
    for r in shown:
        rid = r.get("id")
        wave = f'{r.get("current_wave", "–")} / {r.get("wave_count", "–")}'
        rows.append(
            f'<tr data-rollout="{e(str(rid))}"><td><a href="{e(rollout_href(rid))}">{e(str(rid))}</a></td>'
            f'<td>{pill(str(r.get("status") or "unknown"))}</td><td>{_bundle(r.get("bundle"))}</td>'
            f'<td>{e(", ".join(map(str, r.get("targets") or [])) or "–")}</td><td>{e(wave)}</td>'
            f'<td>{_phases(r.get("phases"))}</td><td>{fmt_time(r.get("created"))}</td>'
            f'<td class="reason">{e(str(r.get("reason") or ""))}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("Rollout", "Status", "Bundle", "Targets", "Wave", "Devices", "Started",
                                             "Reason"))
    more = len(items) - len(shown)
    note = f'<p class="muted">{len(live)} live; {more} older not shown.</p>' if more > 0 else ""
    return f'<table class="grid rollouts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{note}'


def _option(k: str, v: Any) -> str:
    if v is None:
        return "–"
    if k.endswith("_s") and isinstance(v, (int, float)):
        return f"{v:g} s"
    if "rate" in k and isinstance(v, (int, float)):
        return fmt_rate(v)
    if "regression" in k and isinstance(v, (int, float)):
        return f"{v * 100:g} %"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return e(str(v))


def rollout_page(rollout_id: str, r: dict) -> str:
    """``/rollouts/{id}``: the rollout's state, settings, and each wave's devices with their phase and figures."""
    status = str(r.get("status") or "unknown")
    cards = "".join([
        _card("Status", pill(status)),
        _card("Wave", e(f'{r.get("current_wave", "–")} / {r.get("wave_count", "–")}')),
        _card("Devices", fmt_num(r.get("device_count"))),
        _card("Started", fmt_time(r.get("created")), "time"),
        _card("Finished", fmt_time(r.get("finished")) if r.get("finished") else "–", "time"),
    ])
    reason = r.get("reason")
    banner = (f'<section class="panel banner {"bad" if status not in LIVE + ("completed",) else ""}">'
              f'{e(str(reason))}</section>') if reason else ""
    options = r.get("options") if isinstance(r.get("options"), dict) else {}
    settings = [("Bundle", _bundle(r.get("bundle"))),
                ("Targets", e(", ".join(map(str, r.get("targets") or [])) or "–"))]
    settings += [(k.removesuffix("_s").replace("_", " "), _option(k, v)) for k, v in options.items()
                 if not isinstance(v, (dict, list))]
    if isinstance(options.get("waves"), list):
        settings.insert(2, ("Waves", e(", ".join(map(str, options["waves"])))))
    if r.get("unpublished"):
        settings.append(("Not yet taken by the broker", e(", ".join(map(str, r["unpublished"])))))
    waves = r.get("waves") if isinstance(r.get("waves"), list) else []
    body = "".join(_wave(i, w) for i, w in enumerate(waves) if isinstance(w, dict)) or \
        '<p class="muted">No waves.</p>'
    html = f"""<div id="rollout" data-live>
<section class="titlebar"><h1>Rollout {e(str(rollout_id))}</h1>{pill(status)}
<span class="model">{_bundle(r.get("bundle"))}</span></section>
<section class="cards">{cards}</section>
{banner}
<div class="columns"><section class="panel"><h2>Settings</h2>{_kv(settings)}</section>
<section class="panel"><h2>Waves</h2>{_wave_summary(waves)}</section></div>
{body}
<details class="panel"><summary>As the API answers it</summary><pre>{e(json.dumps(r, indent=2))}</pre></details>
</div>"""
    return layout(f"Rollout {rollout_id}", html)


def _wave_summary(waves: list) -> str:
    if not waves:
        return '<p class="muted">No waves.</p>'
    rows = "".join(
        f'<tr><td>{e(str(w.get("wave", i + 1)))}</td><td>{pill(str(w.get("status") or "unknown"))}</td>'
        f'<td>{len(w.get("devices") or [])}</td><td>{fmt_time(w.get("started"))}</td>'
        f'<td>{fmt_time(w.get("finished"))}</td></tr>'
        for i, w in enumerate(waves) if isinstance(w, dict))
    return ('<table class="grid"><thead><tr><th>Wave</th><th>Status</th><th>Devices</th><th>Started</th>'
            '<th>Finished</th></tr></thead><tbody>' + rows + "</tbody></table>")


def _wave(index: int, w: dict) -> str:
    devices = [d for d in (w.get("devices") or []) if isinstance(d, dict)]
    rows = []
    for d in devices:
        dev = str(d.get("device_id", "?"))
        p95 = fmt_ms(d.get("p95_ms"))
        if d.get("baseline_p95_ms") is not None:
            p95 += f' <span class="muted">(was {fmt_ms(d["baseline_p95_ms"])})</span>'
        back = d.get("rollback") if isinstance(d.get("rollback"), dict) else None
        notes = [str(x) for x in (d.get("verdict"), d.get("reason"), d.get("note")) if x]
        if back:
            notes.append(f'rollback: {back.get("what") or ""} {back.get("phase") or ""}'.strip())
        rows.append(
            f'<tr data-device="{e(dev)}"><td><a href="{e(device_href(dev))}">{e(dev)}</a></td>'
            f'<td>{pill(str(d.get("phase") or "unknown"))}</td>'
            f'<td>{"yes" if d.get("online") else "no" if d.get("online") is False else "–"}</td>'
            f'<td>{"yes" if d.get("soaked") else "no"}</td><td>{fmt_num(d.get("inferences"))}</td>'
            f'<td>{fmt_num(d.get("errors"))}</td><td>{fmt_rate(d.get("error_rate"))}</td><td>{p95}</td>'
            f'<td class="reason">{e("; ".join(notes))}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("Device", "Phase", "Online", "Soaked", "Inferences", "Errors",
                                             "Error rate", "p95", "Notes"))
    table = (f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
             if rows else '<p class="muted">No devices.</p>')
    facts = []
    if w.get("deployment_id"):
        facts.append(f'deployment <code>{e(str(w["deployment_id"]))}</code>')
    if w.get("started"):
        facts.append(f"started {fmt_time(w['started'])}")
    if w.get("finished"):
        facts.append(f"finished {fmt_time(w['finished'])}")
    elif w.get("deadline"):
        facts.append(f"deadline {fmt_time(w['deadline'])}")
    return (f'<section class="panel wave" data-wave="{e(str(w.get("wave", index + 1)))}">'
            f'<h2>Wave {e(str(w.get("wave", index + 1)))} {pill(str(w.get("status") or "unknown"))}</h2>'
            f'<p class="muted">{" · ".join(facts)}</p>{table}</section>')
