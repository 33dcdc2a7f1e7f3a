"""`edgefleet demo`: the main job end to end, on real parts, as separate processes.

Converts the real PP-OCR text-direction classifier (fp32 + int8), starts the fleet controller (with
its own mosquitto, its own CA, mutual TLS everywhere), enrolls three devices (each makes its own key and gets
a certificate with a one-time token) and starts their agents, deploys the int8 bundle to all three,
drives inference traffic with real text crops through each agent's local API (the applications label what
they learn: feedback), prints the fleet's health table, changes one camera's scene (text in poor light) and
shows its drift and falling accuracy, halts a bad update, and makes two attacks. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from agent.errors import EdgefleetError

DEVICES = ("cam-1", "cam-2", "cam-3")
DRIFTING = "cam-3"  # the camera whose scene changes (step 7)


def low_light(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Crops as a camera sees them at dusk: a quarter of the contrast, and sensor noise."""
    return np.clip(x * 0.25 + rng.normal(0, 0.35, x.shape), -1, 1).astype(np.float32)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet.cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise EdgefleetError(f"{what}: a process exited early with {p.returncode} ({' '.join(p.args[3:6])})")
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise EdgefleetError(f"timed out after {timeout:.0f} s waiting for {what}")


class Demo:
    def __init__(self, out: Path, requests: int = 150, telemetry_interval_s: float = 2.0) -> None:
        self.out = out
        self.requests = requests
        self.interval = telemetry_interval_s
        self.procs: list[subprocess.Popen] = []
        self.server: str | None = None
        self.data: Path | None = None  # the controller's data dir (its URL, admin token)
        self.rollout: dict | None = None
        self.logs: list = []
        self.env = dict(os.environ)  # EDGEFLEET_SERVER and EDGEFLEET_CA once the controller runs
        self.fleet_certificates: list[dict] = []

    def _run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """An `edgefleet` command as a user types it; the controller's address and CA come from the environment."""
        kw.setdefault("check", True)
        return subprocess.run(args, env=self.env, **kw)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.out / "logs" / f"{name}.log", "w")
        self.logs.append(log)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=self.env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):  # agents first, then the controller (and its mosquitto)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self.logs:
            log.close()

    def _convert_bad(self, model: Path, x: np.ndarray) -> Path:
        """Version 1.1: the same classifier exported for 48x320 crops (a real mistake: the model takes any
        width, the converter was told the wrong one); it passes its own smoke test."""
        wide = np.zeros((len(x), 3, 48, 320), np.float32)
        wide[:, :, :, :192] = x
        np.savez(self.out / "calib-320.npz", x=wide)
        out = self.out / "bundles-1.1"
        self._run(_cli("convert", str(model), "--target", "cpu", "--calib", str(self.out / "calib-320.npz"),
                       "--input-shape", "x=1x3x48x320", "--out", str(out), "--name", "ocr-cls", "--version", "1.1",
                       "--sign-key", str(self.release_key)),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return next(out.glob("*-int8.tar"))

    def _attacks(self, good: Path, data: Path, fleet, clients) -> dict:
        """A tampered bundle is refused at upload; a forged retained desired is refused by the device, which
        keeps serving 1.0 and says why."""
        import io
        import tarfile

        from agent import bundle, protocol, transport
        from fleet.pki import PKI

        tampered = self.out / "tampered.tar"
        with tarfile.open(good) as src, tarfile.open(tampered, "w", format=tarfile.PAX_FORMAT) as dst:
            for m in src:
                data_ = src.extractfile(m).read()
                if m.name == "model.onnx":  # one byte of the model changed; manifest and signature kept
                    data_ = data_[:-1] + bytes([data_[-1] ^ 1])
                dst.addfile(m, io.BytesIO(data_))
        upload = self._run(_cli("fleet", "deploy", str(tampered), "--to", "cam-1"), check=False,
                           capture_output=True, text=True)
        print(f"$ edgefleet fleet deploy {tampered.name} --to cam-1\n{upload.stderr.strip()} "
              f"(exit {upload.returncode})")
        if upload.returncode == 0:
            raise EdgefleetError("the controller accepted a tampered bundle")

        running = clients["cam-1"].status()["active"]["sha256"]
        info = json.loads((data / "controller.json").read_text())
        url = transport.parse_url(info["broker"])
        # the broker's rights are the controller's certificate, whose CN is also its client id: connecting takes
        # the controller's session over for a moment. Keep that session (clean_start off, its expiry) and ack
        # nothing in it, so what devices send meanwhile waits for the controller, which reconnects at once.
        forger = transport.make_client(url, "forger", PKI(data / "pki").controller_tls(), manual_ack=True)
        forger.connect(url.host, url.port, clean_start=False, properties=transport.connect_properties(7 * 86400))
        forger.loop_start()
        # an unsigned bundle (the good one without manifest.sig), put where the controller serves bundles, as a
        # compromised controller host could
        unsigned = data / "bundles" / ".unsigned.tar"
        with tarfile.open(good) as src, tarfile.open(unsigned, "w", format=tarfile.PAX_FORMAT) as dst:
            for m in src:
                if m.name != "manifest.sig":
                    dst.addfile(m, src.extractfile(m))
        sha = bundle.sha256_file(unsigned)
        unsigned.rename(data / "bundles" / f"{sha}.tar")
        forged = protocol.Desired(deployment_id="dep-forged", name="ocr-cls", version="6.6.6",
                                  url=f"{info['http'].rstrip('/')}/bundles/{sha}", sha256=sha,
                                  size=(data / "bundles" / f"{sha}.tar").stat().st_size,
                                  time=time.time(), device_id="cam-1", expires=time.time() + 3600,
                                  counter=int(time.time() * 1000) + 10**9)
        forger.publish(protocol.topic("cam-1", protocol.DESIRED), protocol.encode(forged), qos=1,
                       retain=True).wait_for_publish(30)
        forger.disconnect()
        forger.loop_stop()

        def refusal():
            return next((e for e in fleet.health("cam-1")["events"]
                         if e["kind"] == "failed" and e.get("deployment_id") == "dep-forged"), None)

        event = _wait("cam-1 to refuse the forged desired", refusal, 60, self.procs)
        print(f"cam-1 was sent the unsigned bundle {sha[:12]} in a desired forged on the broker: failed: "
              f"{event['reason']}")
        still = clients["cam-1"].status()["active"]
        print(f"cam-1 still runs {still['version']} ({still['sha256'][:12]}), signed by release key "
              f"{still.get('signed_by')}, serial {still.get('serial')}")
        if still["sha256"] != running:
            raise EdgefleetError("cam-1 moved on a forged desired")
        return {"upload": upload.stderr.strip(), "forged": event["reason"]}

    def _scene_change(self, fleet, apis: dict, x: np.ndarray, y: np.ndarray) -> dict:
        """Step 7: cam-3's camera starts seeing the text in poor light while the others see what they always
        saw; every application keeps labelling. Counts the telemetry windows until the controller calls cam-3's
        drift significant."""
        from agent.api import AgentClient

        _say(f"7/10 the scene changes on {DRIFTING}: its camera now sees the text in poor light (a quarter of the "
             f"contrast, sensor noise); the applications keep labelling what they learn")
        changed = time.time()
        stop = threading.Event()
        served = {dev: [0, 0] for dev in DEVICES}  # inferences, right

        def scene(dev: str) -> None:
            client = AgentClient(apis[dev])
            rng = np.random.default_rng(100 + DEVICES.index(dev))
            while not stop.is_set():
                i = int(rng.integers(0, len(x)))
                crop = low_light(x[i : i + 1], rng) if dev == DRIFTING else x[i : i + 1]
                outputs, rid = client.infer({"x": crop}, with_id=True)
                served[dev][0] += 1
                served[dev][1] += int(next(iter(outputs.values())).argmax(1)[0] == y[i])
                client.feedback(rid, int(y[i]))
                time.sleep(0.01)
            client.close()

        def flagged():
            q = fleet.device_quality(DRIFTING, since=changed)
            return (q["drift"] or {}).get("reference", {}).get("band") == "significant" and q

        threads = [threading.Thread(target=scene, args=(d,)) for d in DEVICES]
        for t in threads:
            t.start()
        try:
            q = _wait(f"the controller to flag {DRIFTING}'s drift", flagged, 60, self.procs)
            windows = q["windows"]  # the telemetry windows since the change, the flagging one included
            # a little more traffic, so that every device's accuracy has labels enough to tell
            _wait("100 labelled inferences on every device", lambda: all(n >= 100 for n, _ in served.values()),
                  60, self.procs)
        finally:
            stop.set()
            for t in threads:
                t.join()
        ref = q["drift"]["reference"]
        print(f"{DRIFTING} flagged after {windows} telemetry window(s) of {self.interval:g} s: drift PSI "
              f"{ref['psi']:.2f} against the bundle's reference ({ref['worst']['feature']} of its output), "
              f"{ref['band']}")
        since_change = {}
        for dev in DEVICES:
            n, right = served[dev]
            since_change[dev] = right / n
            print(f"{dev}: {n} inferences since the change, {right / n:.0%} right about the text direction")

        def labelled():
            qs = {d: fleet.device_quality(d, since=changed) for d in DEVICES}
            return all(((qs[d]["feedback"] or {}).get("scored") or 0) >= 100 for d in DEVICES) and qs

        qs = _wait("the controller to have every device's labels", labelled, 60, self.procs)
        self._run(_cli("fleet", "health"))
        self._run(_cli("fleet", "health", DRIFTING))
        print(f"the dashboard shows the same: {self.server}/ (the worst devices first) and "
              f"{self.server}/devices/{DRIFTING} (charts over time, the confusion matrix)")
        return {"windows_to_flag": windows, "psi": ref["psi"], "band": ref["band"],
                "accuracy": {d: qs[d]["feedback"]["accuracy"] for d in DEVICES},
                "drift": {d: qs[d]["drift"]["reference"]["band"] for d in DEVICES},
                "accuracy_seen": since_change}

    def run(self) -> dict:
        t_start = time.monotonic()
        from edgefleet.data import text_direction
        from edgefleet.models import model_path

        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "logs").mkdir(parents=True)

        _say("1/10 the real model: PP-OCR text-direction classifier, from the rapidocr-onnxruntime wheel")
        model = model_path("ocr-cls")
        calib, labels = self.out / "calib.npz", self.out / "labels.npy"
        x, y = text_direction()
        np.savez(calib, x=x)
        np.save(labels, y)
        print(f"{model}\ncalibration + held-out data: {len(x)} crops of printed text from skimage.data.page(), "
              f"labelled 0° / 180°")

        _say("2/10 a release key (kept on this host, never on the controller); convert for the cpu target, every "
             "variant checked against fp32 (the gate allows a 2 % accuracy drop) and signed")
        keys = self.out / "keys"
        self._run(_cli("keys", "generate", "--out", str(keys), "--name", "release"))
        self.release_key, release_pub = keys / "release.key", keys / "release.pub"
        bundles = self.out / "bundles"
        self._run(_cli("convert", str(model), "--target", "cpu", "--calib", str(calib), "--labels", str(labels),
                       "--input-shape", "x=1x3x48x192", "--max-accuracy-drop", "2%", "--out", str(bundles),
                       "--name", "ocr-cls", "--version", "1.0", "--sign-key", str(self.release_key)))
        report = json.loads((bundles / "report.json").read_text())
        int8 = next(bundles.glob("*-int8.tar"))

        _say("3/10 start the fleet controller (SQLite, its own CA and signing key, mosquitto with mutual TLS and an "
             "ACL; it accepts bundles signed by the release key), enroll three devices (each trusts the release "
             "key), start their agents")
        data = self.out / "fleet"
        controller = self._spawn("controller", _cli("fleet", "serve", "--data", str(data), "--http",
                                                     "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0",
                                                     "--release-key", str(release_pub)))
        info_file = data / "controller.json"
        info = _wait("the controller", lambda: info_file.exists() and json.loads(info_file.read_text()),
                     60, [controller])
        server, broker = info["http"], info["broker"]
        self.server, self.data = server, data
        self.env["EDGEFLEET_DATA"] = str(data)  # where the CLI finds the controller's URL, CA and admin token
        print(f"controller {server}, broker {broker}, CA fingerprint {info['ca_fingerprint']}; its API takes the "
              f"admin token it made in {data / 'admin.token'} (the CLI reads it with --data, or $EDGEFLEET_DATA)")
        apis = {}
        for dev in DEVICES:
            state = self.out / "devices" / dev
            state.mkdir(parents=True)
            apis[dev] = f"127.0.0.1:{_free_port()}"
            (state / "agent.toml").write_text(  # on a real device the trust store is /etc/edgefleet/trust
                f'state_dir = "{state}"\napi = "{apis[dev]}"\ntelemetry_interval_s = {self.interval}\n'
                f'trust_dir = "{state / "trust"}"\n')
            # the administrator makes a one-time token; the device makes its key and enrolls with it
            token = json.loads(self._run(_cli("fleet", "enroll", dev, "--ttl", "10m", "--json"),
                                         capture_output=True, text=True).stdout)
            enrolled = self._run(_cli("agent", "enroll", "--controller", token["controller"], "--token", token["token"],
                                      "--ca-fingerprint", token["ca_fingerprint"], "--config", str(state / "agent.toml"),
                                      "--trust", str(release_pub)),
                                 capture_output=True, text=True)
            print(enrolled.stdout.strip())
            self._spawn(dev, _cli("agent", "run", "--config", str(state / "agent.toml")))

        from agent.api import AgentClient
        from fleet.client import FleetClient

        fleet = FleetClient.configured(data=data, env={})
        _wait("three devices online", lambda: sum(d["online"] for d in fleet.health()) == 3, 60, self.procs)
        self._run(_cli("fleet", "devices"))

        _say(f"4/10 deploy the int8 bundle {int8.name} to {', '.join(DEVICES)}")
        self._run(_cli("fleet", "deploy", str(int8), "--to", *DEVICES))
        clients = {dev: AgentClient(api) for dev, api in apis.items()}

        def all_int8():
            return all((c.status().get("active") or {}).get("precision") == "int8" for c in clients.values())

        _wait("the int8 model active on all three devices", all_int8, 120, self.procs)
        print("active on all three")

        _say(f"5/10 inference traffic: {self.requests} real text crops through each agent's local API; each "
             f"application labels what it learns (POST /v1/feedback)")
        labels = y
        results = {}

        def drive(dev: str) -> None:
            client = AgentClient(apis[dev])
            rng = np.random.default_rng(DEVICES.index(dev))
            correct = 0
            for i in rng.integers(0, len(x), self.requests):
                outputs, rid = client.infer({"x": x[i : i + 1]}, with_id=True)
                correct += int(next(iter(outputs.values())).argmax(1)[0] == labels[i])
                client.feedback(rid, int(labels[i]))  # the application learns the truth later, and says so
            results[dev] = correct
            client.close()

        threads = [threading.Thread(target=drive, args=(d,)) for d in DEVICES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for dev in DEVICES:
            print(f"{dev}: {self.requests} inferences, {results[dev] / self.requests:.1%} right about the text direction")

        def counted():
            health = fleet.health()
            return len(health) == 3 and all(d["inferences"] >= self.requests for d in health) and health

        health = _wait("the devices' telemetry to reach the controller", counted, 60, self.procs)

        _say("6/10 the fleet's health, as the devices reported it (drift of the outputs against the bundle's "
             "reference profile, golden-input canary, accuracy from feedback)")
        self._run(_cli("fleet", "health"))
        self.quality = self._scene_change(fleet, apis, x, y)

        _say("8/10 a bad update: version 1.1 was exported for 320-pixel-wide crops, the cameras send 192; "
             "rolled out in waves, gated on the error rate the devices see")
        bad = self._convert_bad(model, x)
        out = self._run(_cli("fleet", "deploy", str(bad), "--to", "all", "--waves", "1,100%", "--soak", "3s",
                             "--max-error-rate", "5%", "--min-inferences", "20", "--json"), capture_output=True, text=True)
        rollout = json.loads(out.stdout)["id"]
        print(f"rollout {rollout}: wave 1 = one device, then the rest")
        stop = threading.Event()
        refused = {dev: 0 for dev in DEVICES}

        def keep_driving(dev: str) -> None:  # the cameras' applications keep sending what they see
            client = AgentClient(apis[dev])
            rng = np.random.default_rng(200 + DEVICES.index(dev))
            i = 0
            while not stop.is_set():
                crop = x[i % len(x) : i % len(x) + 1]
                try:
                    client.infer({"x": low_light(crop, rng) if dev == DRIFTING else crop})
                except EdgefleetError:
                    refused[dev] += 1
                i += 1
                time.sleep(0.02)
            client.close()

        drivers = [threading.Thread(target=keep_driving, args=(d,)) for d in DEVICES]
        for t in drivers:
            t.start()
        try:
            done = _wait("the rollout to be halted", lambda: (r := fleet.rollout(rollout))["status"] in (
                "halted", "rolled_back", "completed", "aborted") and r, 120, self.procs)
            _wait("the halted wave back on version 1.0", lambda: all(
                (c.status().get("active") or {}).get("version") == "1.0" for c in clients.values()), 120, self.procs)
        finally:
            stop.set()
            for t in drivers:
                t.join()
        self._run(_cli("fleet", "rollout", rollout))
        print(f"requests the applications saw refused: {', '.join(f'{d} {n}' for d, n in refused.items())}")

        def settled():
            h = fleet.health()
            return all(d["model"] and d["model"]["version"] == "1.0" for d in h) and h

        health = _wait("the controller to see every device on 1.0", settled, 60, self.procs)
        _say("9/10 the fleet after the bad update: stopped at one device, which is back on 1.0")
        self._run(_cli("fleet", "health"))

        _say("10/10 two attacks: a tampered copy of the good bundle uploaded, and a forged desired published on the "
             "broker with the controller's certificate (not its signing key)")
        self.attacks = self._attacks(int8, data, fleet, clients)
        elapsed = time.monotonic() - t_start
        variants = {v["variant"]: v for v in report.get("variants", [])}
        self.rollout = done
        self.fleet_certificates = fleet.certificates()
        return {"health": health, "elapsed_s": elapsed, "variants": variants, "quality": self.quality}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory (replaced)")
    parser.add_argument("--requests", type=int, default=150, help="inferences per device")
    parser.add_argument("--json", action="store_true", help="print the final health as JSON too")
    args = parser.parse_args(argv)
    demo = Demo(args.out.resolve(), requests=args.requests)
    try:
        result = demo.run()
    finally:
        demo.stop_all()
    left = [p.pid for p in demo.procs if p.poll() is None]
    if left:
        raise EdgefleetError(f"processes still running: {left}")
    if args.json:
        print(json.dumps(result["health"], indent=2))
    print(f"\ndemo finished in {result['elapsed_s']:.0f} s; every process it started has stopped "
          f"(logs in {args.out / 'logs'})")
    return 0
