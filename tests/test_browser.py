"""The dashboard in a real browser: headless Debian Chromium (driven by Playwright) on a real controller with
two real agents serving real models, deployed through the API and fed real inferences.

Screenshots are kept under the test's tmp dir, and copied to $EDGEFLEET_SCREENSHOT_DIR when it is set
(docs/dashboard.png is the device page taken this way)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_web import converted, fleet_with_agents  # noqa: F401  (converted is a fixture)
from util import admin_token, wait_for

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# the charts that have data whenever a device serves (temperature has none on a machine without sensors)
DRAWN = ("latency", "errors", "throughput", "cpu", "memory")
QUALITY = ("psi", "canary", "accuracy")  # the model-quality charts (fleet/pages_quality.py)
QUALITY_WINDOWS = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium: run `make test`, "
                                                     "whose set-up installs it"),
]


def keep(shot: Path) -> None:
    where = os.environ.get("EDGEFLEET_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(where) / shot.name)


def spki(fleet) -> str:
    """The base64 sha256 of the controller certificate's public key, as Chromium's SPKI allow-list takes it."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(fleet.pki.controller_crt.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def wait_js(page, expression: str, timeout: float = 30.0) -> None:
    """Wait until ``expression`` is true in the page. (Playwright's wait_for_function evaluates its predicate
    with eval(), which the dashboard's Content-Security-Policy forbids, as it should; evaluate() does not.)"""
    wait_for(lambda: page.evaluate(expression), timeout=timeout, what=expression, every=0.1)


def points(page, chart: str) -> int:
    return int(page.get_attribute(f'figure[data-chart="{chart}"]', "data-points"))


def record_quality(fleet, agent, device_id: str, sha: str, crops) -> list[list[int]]:
    """QUALITY_WINDOWS quality windows for ``agent``'s device ``device_id`` on its bundle ``sha``, filed as the
    controller's link files them: the device's own outputs (its local API) on the real crops, served twice a
    window, folded by ``agent.quality.Folder`` into the bundle's profile; 16 canary runs; the crops' labels as
    feedback. Returns the confusion matrix (true rows) the page must show."""
    import time

    import numpy as np

    from agent import protocol
    from agent import quality as aq
    from agent.api import AgentClient
    from conftest import OUTPUT

    _, profile = fleet.store.reference(sha)
    x, labels = crops
    api = AgentClient(agent.api.address)
    out = np.concatenate([api.infer({"x": x[i:i + 1]})[OUTPUT] for i in range(len(x))])
    index = {c: i for i, c in enumerate(profile.outputs[0].classes)}
    n = len(index) + 1
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(labels, out.argmax(1)):
        matrix[index.get(int(t), n - 1)][index.get(int(p), n - 1)] += 1
    cells = [[t, p, c] for t, row in enumerate(matrix) for p, c in enumerate(row) if c]
    now = time.time()
    for w in range(QUALITY_WINDOWS):
        folder = aq.Folder(profile)
        folder.add({OUTPUT: out})
        folder.add({OUTPUT: out})
        taken = folder.take()
        at = now - 60 * (QUALITY_WINDOWS - w)
        assert fleet.store.record_quality(protocol.Quality(
            device_id=device_id, boot_id="boot-quality", seq=w + 1, time=at, interval_s=60.0,
            sha256=sha, version="2.1", profile=profile.id, served=2 * len(x),
            bins=[taken[o.name] for o in profile.outputs],
            canary=protocol.Canary(runs=16, agree=16 - w % 2, max_abs_err=0.01, time=at),
            feedback=protocol.Feedback(labels=len(x), confusion=cells)), received=at)
    return [[QUALITY_WINDOWS * c for c in row] for row in matrix]


def test_overview_and_device_page_render_live_charts(tmp_path, bundles, converted, crops):  # noqa: F811
    from playwright.sync_api import sync_playwright

    deploy = {"cam-dock": converted, "cam-gate": bundles["v1"]}
    # kept screenshots (the README's) show a minute of telemetry; the test alone needs a few windows
    interval, windows = (1.0, 60) if os.environ.get("EDGEFLEET_SCREENSHOT_DIR") else (0.3, 6)
    with fleet_with_agents(tmp_path, deploy, crops, interval=interval, windows=windows,
                           bad_every={"cam-dock": 40}) as (fleet, agents, up), sync_playwright() as pw:
        confusion = record_quality(fleet, agents["cam-dock"], "cam-dock", up["upload"]["cam-dock"]["sha256"], crops)
        # trust the controller's certificate (and nothing else) the way a user who imported the fleet CA does
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=[*ARGS, f"--ignore-certificate-errors-spki-list={spki(fleet)}"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            problems: list[str] = []
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            # not signed in: the sign-in page, then back to the page asked for
            page.goto(fleet.http_url + "/", wait_until="networkidle")
            assert page.url == fleet.http_url + "/login?next=%2F"
            page.fill("#token", admin_token(fleet))
            page.click("form button[type=submit]")
            page.wait_for_url(fleet.http_url + "/")
            page.wait_for_load_state("networkidle")
            [cookie] = page.context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] not in admin_token(fleet)

            # the overview: both devices, online, with their models, each linking to its page
            assert page.get_attribute("#counts", "data-online") == "2"
            for device, version in (("cam-dock", "2.1"), ("cam-gate", "1")):
                row = page.locator(f'tr[data-device="{device}"]')
                assert row.locator("td").nth(0).inner_text() == "online"
                assert row.locator("td").nth(3).inner_text() == version
                assert row.locator(f'a[href="/devices/{device}"]').count() == 1
            # the fleet's aggregates (fleet/aggregate.py): one row a model version, the worst devices by p95, and
            # the device table a page at a time (both fit on the first: no next link)
            assert page.locator('#models tr[data-model="ocr-cls"]').count() == 2
            assert page.locator("#worst-p95 tr[data-worst-device]").count() == 2
            assert page.get_attribute("nav.pager", "data-shown") == "2" and page.locator('a[rel="next"]').count() == 0
            # the worst devices by model quality: cam-dock sent quality windows, cam-gate none
            row = page.locator('#quality-worst tr[data-quality-device="cam-dock"]')
            assert row.count() == 1 and row.locator('a[href="/devices/cam-dock"]').count() == 1
            assert page.locator("#quality-worst tr[data-quality-device]").count() == 1
            wait_js(page, "document.getElementById('live-status').textContent.startsWith('live ·')")
            page.screenshot(path=str(tmp_path / "dashboard-overview.png"))
            keep(tmp_path / "dashboard-overview.png")

            # a device page: the charts draw the series of real telemetry windows
            page.click('a[href="/devices/cam-dock"]')
            page.wait_for_url("**/devices/cam-dock")
            wait_js(page, "[...document.querySelectorAll('figure.chart')].every(f => f.dataset.state)")
            for chart in DRAWN:
                fig = f'figure[data-chart="{chart}"]'
                assert page.get_attribute(fig, "data-state") == "drawn", chart
                assert points(page, chart) > 1, chart
                assert page.locator(f"{fig} canvas").count() == 1, chart
                painted = page.evaluate(
                    """key => { const c = window.edgefleetCharts[key].ctx.canvas;
                                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                                let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n; }""", chart)
                assert painted > 1000, (chart, painted)  # the canvas has axes and lines on it, not blank
            with_data = page.evaluate("window.edgefleetCharts.latency.data[3].filter(v => v !== null).length")
            assert with_data > 1  # p99 over more than one window
            assert page.get_attribute('figure[data-chart="temperature"]', "data-state") in ("drawn", "no-sensor")
            # model quality: its charts draw the quality windows, the confusion matrix shows the labels
            for chart in QUALITY:
                fig = f'#quality figure[data-chart="{chart}"]'
                assert page.get_attribute(fig, "data-state") == "drawn", chart
                assert points(page, chart) >= QUALITY_WINDOWS, chart
                assert page.locator(f"{fig} canvas").count() == 1, chart
                painted = page.evaluate(
                    """key => { const c = window.edgefleetCharts[key].ctx.canvas;
                                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                                let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i]) n++; return n; }""", chart)
                assert painted > 1000, (chart, painted)
            agreement = page.evaluate("window.edgefleetCharts.canary.data[1].filter(v => v !== null)")
            assert sorted(set(agreement)) == [1500 / 16, 100.0]  # 15 and 16 of 16 runs, as percentages
            matrix = page.locator("#quality table.confusion")
            assert matrix.is_visible()
            shown = [[int(td.inner_text()) for td in tr.locator("td[data-pred]").all()]
                     for tr in matrix.locator("tbody tr").all()]
            assert shown == confusion and sum(map(sum, shown)) == QUALITY_WINDOWS * len(crops[1])
            assert "Converter report" in page.inner_text("#device-tail")
            assert "int8" in page.inner_text("#device-head")

            # live: new telemetry windows reach the open page without a reload
            before = points(page, "cpu")
            wait_js(page, f"+document.querySelector('figure[data-chart=\"cpu\"]').dataset.points > {before}")
            page.screenshot(path=str(tmp_path / "dashboard-device.png"))
            page.screenshot(path=str(tmp_path / "dashboard-device-full.png"), full_page=True)
            keep(tmp_path / "dashboard-device.png")
            keep(tmp_path / "dashboard-device-full.png")

            assert problems == [], problems

            # a device nobody knows: the 404 page (the browser logs the 404 itself; no script error)
            response = page.goto(fleet.http_url + "/devices/cam-none")
            assert response.status == 404 and "No such device" in page.inner_text("main")
            assert [p for p in problems if "404" not in p] == [], problems

            # signing out ends the session: the pages ask to sign in again
            page.goto(fleet.http_url + "/", wait_until="networkidle")
            page.click("form.signout button")
            page.wait_for_url("**/login")
            page.goto(fleet.http_url + "/devices/cam-dock")
            assert page.url == fleet.http_url + "/login?next=%2Fdevices%2Fcam-dock"
        finally:
            browser.close()
