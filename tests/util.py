"""Helpers the tests share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", every: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (and return that); generous by default,
    since these machines are shared: a bound on waiting, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# -- identities: every test runs the secure default (mutual TLS with certificates from a fleet CA) -----------
def issue_tls(pki, device_id: str, directory: Path, store=None):
    """A key made here and a certificate for ``device_id`` from ``pki`` (recorded in ``store`` as enrolled, when
    given): the ``agent.transport.Tls`` a raw paho client presents to speak as that device."""
    from agent.identity import _new_key_and_csr
    from agent.transport import Tls
    from fleet.pki import fingerprint, pem

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, key_pem, csr = _new_key_and_csr(device_id)
    cert = pki.sign_csr(csr, device_id, 86400)
    if store is not None:
        store.add_certificate(cert.serial_number, device_id, fingerprint(cert), cert.not_valid_before_utc.timestamp(),
                              cert.not_valid_after_utc.timestamp(), "enroll")
    (directory / f"{device_id}.key").write_bytes(key_pem)
    (directory / f"{device_id}.crt").write_text(pem(cert))
    return Tls(str(pki.ca_crt), str(directory / f"{device_id}.crt"), str(directory / f"{device_id}.key"))


def enroll(fleet, state_dir: Path, device_id: str):
    """Enroll ``state_dir`` as ``device_id`` the way a device does: a one-time token, then HTTPS."""
    from agent import identity

    token = fleet.enrollment.create_token(device_id=device_id)
    return identity.enroll(state_dir, fleet.http_url, token["token"], token["ca_fingerprint"])


_RELEASE: dict = {}


def release_key():
    """The tests' release key, made once per test process: (private key, trust dir holding its .pub). The
    ``bundles`` fixture signs with it; ``agent_config`` trusts it; test fleets list it."""
    if not _RELEASE:
        import tempfile

        from agent import signing

        d = Path(tempfile.mkdtemp(prefix="edgefleet-release-"))
        key, pub = signing.generate(d / "trust", "tests")
        _RELEASE.update(key=signing.load_private(key), trust_dir=d / "trust", pub=pub)
    return _RELEASE["key"], _RELEASE["trust_dir"]


def release_pub() -> Path:
    release_key()
    return _RELEASE["pub"]


def agent_config(fleet, state_dir: Path, device_id: str, **kw):
    """An enrolled device's validated config (broker, controller and certificate from the enrollment), trusting
    the tests' release key."""
    from agent.config import AgentConfig, validate

    enroll(fleet, Path(state_dir), device_id)
    kw.setdefault("trust_dir", str(release_key()[1]))
    kw.setdefault("telemetry_interval_s", kw.pop("interval", 0.5))
    return validate(AgentConfig(state_dir=str(state_dir), **kw))


def cli_args(fleet, token: str | None = None) -> list[str]:
    """What `edgefleet fleet` commands need to reach this controller: its URL, CA and a token (the admin's)."""
    return ["--server", fleet.http_url, *(["--ca", str(fleet.pki.ca_crt)] if fleet.pki else []),
            "--token", token or admin_token(fleet)]


def ssl_context(fleet):
    """An SSLContext trusting this controller's CA (None for an insecure one), for raw urllib requests."""
    import ssl

    return ssl.create_default_context(cafile=str(fleet.pki.ca_crt)) if fleet.pki else None


def admin_token(fleet) -> str:
    """A controller's first admin token, where `fleet serve` keeps it (DATA/admin.token)."""
    return (fleet.data_dir / "admin.token").read_text().strip()


def bearer(fleet, token: str | None = None) -> dict[str, str]:
    """The Authorization header of ``token`` (default: the controller's admin token)."""
    return {"Authorization": f"Bearer {token or admin_token(fleet)}"}


def fleet_client(fleet, token: str | None = None, **kw):
    """A FleetClient of a started ``fleet.app.Fleet``, trusting its CA, with ``token`` (default: its admin token)."""
    from fleet.client import FleetClient

    return FleetClient(fleet.http_url, token=token or admin_token(fleet),
                       ca=str(fleet.pki.ca_crt) if fleet.pki else None, **kw)


def snapshot(root: Path) -> list[str]:
    """Every path under ``root``, relative and sorted: what a refused command must leave as it found it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused_in_one_line(code: int, captured, needle: str, prog: str = "edgefleet convert") -> None:
    """A CLI's refusal (``captured``: capsys.readouterr()): exit 2, one line on stderr naming ``needle``, nothing on
    stdout, no traceback."""
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def preload(state_dir: Path, tar: Path) -> str:
    """Put a verified model in the state dir as `current`, the way an update leaves it; returns its sha256."""
    import hashlib

    from agent import bundle
    from agent.store import ModelStore

    sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    store = ModelStore(state_dir)
    store.open()
    bundle.safe_unpack(tar, store.models / sha)
    store.activate(sha, None)
    return sha


def wrong_answers(run, x, want, threads: int = 4, rounds: int = 3) -> list[int]:
    """Call ``run({"x": x[i:i+1]})`` for every row from ``threads`` threads at once, ``rounds`` times; the rows whose
    first output is not exactly ``want[i]`` (what each caller got back must be its own answer)."""
    import threading

    import numpy as np

    wrong: list[int] = []

    def caller(k: int) -> None:
        for _ in range(rounds):
            for i in range(k, len(x), threads):
                if not np.array_equal(next(iter(run({"x": x[i:i + 1]}).values())), want[i]):
                    wrong.append(i)

    started = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return wrong


class SimRun:
    """`fleet simulate`'s Simulator run in a thread (as the CLI runs it in the main one) until ``stop()``:
    ``count`` devices named ``sim-...`` that enroll with the token ``provisioning(missing)`` returns."""

    def __init__(self, state: Path, count: int, provisioning, timeout: float = 120.0, **settings) -> None:
        import threading

        from fleet.simdevice import Settings
        from fleet.simulate import Simulator

        self.timeout = timeout
        self.sim = Simulator(state, count, "sim-", Settings(**settings), 200.0, provisioning, seed=1)
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.sim.run(None)
        except BaseException as e:  # handed to the test
            self.error = e

    def settle(self) -> None:
        """No more telemetry; wait until the controller has acknowledged every window sent."""
        for d in list(self.sim.devices):
            d.quiet()
        wait_for(lambda: all(not d.unacked for d in list(self.sim.devices)), self.timeout,
                 what="every window acknowledged by the controller")

    def stop(self) -> dict:
        self.sim.stop()
        self.thread.join(self.timeout)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.summary
