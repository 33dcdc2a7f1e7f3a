"""Who may speak to the fleet: real attacks against a real controller, its real mosquitto (mutual TLS, the ACL,
the CRL) and its HTTPS enrollment, on 127.0.0.1. Every attack must fail; each test would pass the attack
through if its defence were removed (anonymous access, the ACL, use_username_as_clientid, max_packet_size,
token checks, the CRL and the kick, clone detection)."""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
from pathlib import Path

import pytest
from util import agent_config, enroll, fleet_client, issue_tls, release_pub, wait_for

from agent import identity, protocol, signing, transport
from agent.daemon import Agent
from agent.errors import EdgefleetError
from fleet.app import Fleet
from fleet.pki import PKI

TIMEOUT = 30.0


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],  # /metrics per device: a test reads one's conflict
              http_port=0, mqtt_listen="127.0.0.1:0", metrics_per_device=True).start_background()
    yield f
    f.stop()


class Client:
    """A raw MQTT v5 client with some identity (or none), recording what it gets and how its publishes end."""

    def __init__(self, fleet, tls: transport.Tls | None, client_id: str = "someone", url: str | None = None,
                 expect_connect: bool = True) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, str] = {}
        self.disconnects: list[str] = []
        self.connected = threading.Event()
        u = transport.parse_url(url or fleet.broker_url)
        self.c = transport.make_client(u, client_id, tls)
        self.c.reconnect_delay_set(30, 60)  # no quick reconnect: a test sees each disconnect as it is
        self.c.on_connect = lambda c, ud, f, rc, p: (not rc.is_failure) and self.connected.set()
        self.c.on_disconnect = lambda c, ud, f, rc, p: (self.disconnects.append(str(rc)), self.connected.clear())
        self.c.on_message = lambda c, ud, m: self.got.append((m.topic, m.payload))
        self.c.on_publish = lambda c, ud, mid, rc, p: self.acks.__setitem__(mid, str(rc))
        self.error: str | None = None
        try:
            self.c.connect(u.host, u.port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            self.error = transport.describe(e)
            return
        self.c.loop_start()
        if expect_connect:
            assert self.connected.wait(TIMEOUT), "the broker did not accept the connection"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """Publish at QoS 1 and return the PUBACK's reason ('Success' or why it was refused)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        wait_for(lambda: info.mid in self.acks, TIMEOUT, what="the PUBACK")
        return self.acks[info.mid]

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(TIMEOUT)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def state(device_id: str, boot_id: str = "0123456789abcdef", **kw) -> bytes:
    return protocol.encode(protocol.State(device_id=device_id, online=True, time=time.time(), boot_id=boot_id, **kw))


# -- who may connect ---------------------------------------------------------------------------------------------


def test_anonymous_plaintext_foreign_ca_and_unknown_clients_cannot_connect(fleet, tmp_path):
    u = transport.parse_url(fleet.broker_url)
    # plaintext MQTT to the TLS port: the broker answers no CONNACK
    plain = Client(fleet, None, url=f"mqtt://{u.host}:{u.port}", expect_connect=False)
    assert not plain.connected.wait(3)
    plain.close()
    # TLS without a client certificate (anonymous): the handshake fails
    with pytest.raises(transport.TransportError, match="broker"):
        transport.probe(u, transport.Tls(str(fleet.pki.ca_crt)))
    anon = Client(fleet, transport.Tls(str(fleet.pki.ca_crt)), expect_connect=False)
    assert not anon.connected.wait(3)
    anon.close()
    # a certificate from another CA, for a device id that exists in no fleet and for the controller's CN
    other = PKI(tmp_path / "other-ca").ensure(["localhost"])
    for cn in ("cam-1", "controller@edgefleet"):
        foreign = issue_tls(other, cn, tmp_path / "foreign")
        foreign = transport.Tls(str(fleet.pki.ca_crt), foreign.cert, foreign.key)  # trusts the real broker
        with pytest.raises(transport.TransportError, match="refused our certificate|closed the connection"):
            transport.probe(u, foreign)
        c = Client(fleet, foreign, expect_connect=False)
        assert not c.connected.wait(3)
        c.close()
    # and an agent with such a certificate says so (in its log and its status), never connects, serves on
    state_dir = tmp_path / "stranger"
    cfg = agent_config(fleet, state_dir, "stranger", api="127.0.0.1:0")
    ident = identity.Identity.load(state_dir)
    shutil.copy(issue_tls(other, "stranger", tmp_path / "x").cert, ident.root / ident.cert_file)
    shutil.copy(Path(tmp_path / "x" / "stranger.key"), ident.root / ident.key_file)
    stranger = Agent(cfg)
    stranger.start()
    try:
        why = wait_for(lambda: stranger.status()["broker_error"], what="the reason at the agent")
        wait_for(lambda: "refused our certificate" in (why := stranger.status()["broker_error"] or "")
                 or "closed the connection" in why, what="the refusal named")
        assert not stranger.link.connected
    finally:
        stranger.stop()
    # none of them made the controller register anything but the enrolled id's nothing
    assert fleet_client(fleet).devices() == []


# -- what an enrolled device may do ------------------------------------------------------------------------------


def test_a_device_speaks_only_for_itself(fleet, tmp_path):
    """Device a publishes as b, publishes desired and cmd (its own and b's), subscribes to # and to b's topics,
    and connects with b's and the controller's client id: all refused; b and the controller unaffected."""
    a_tls = issue_tls(fleet.pki, "cam-a", tmp_path, fleet.store)
    b = Client(fleet, issue_tls(fleet.pki, "cam-b", tmp_path, fleet.store), client_id="cam-b")
    b.subscribe(protocol.topic("cam-b", protocol.DESIRED), protocol.topic("cam-b", protocol.CMD))
    a = Client(fleet, a_tls, client_id="cam-b")  # asks for b's client id: gets its own CN
    a.subscribe("#", "edgefleet/v1/cam-b/#", "$SYS/#")
    # another device asks for the controller's client id
    other = Client(fleet, issue_tls(fleet.pki, "cam-c", tmp_path, fleet.store), client_id="controller@edgefleet")
    client = fleet_client(fleet)

    not_authorized = "Not authorized"
    assert a.publish(protocol.topic("cam-b", protocol.STATE), state("cam-b", agent_version="forged")) == not_authorized
    tel = protocol.encode(protocol.Telemetry(device_id="cam-b", boot_id="0" * 16, seq=1, time=time.time(),
                                             interval_s=10, inferences=10 ** 6, errors={"fake": 10 ** 6}))
    assert a.publish(protocol.topic("cam-b", protocol.TELEMETRY), tel) == not_authorized
    assert a.publish("edgefleet/v1/cam-new/state", state("cam-new")) == not_authorized  # a made-up device
    for victim in ("cam-a", "cam-b"):
        desired = protocol.encode(protocol.Desired(deployment_id="dep-evil", name="x", version="1",
                                                   url="https://evil.example/x.tar", sha256="a" * 64, size=1))
        assert a.publish(protocol.topic(victim, protocol.DESIRED), desired, retain=True) == not_authorized
        cmd = protocol.encode(protocol.Cmd(id="c1", kind="rollback"))
        assert a.publish(protocol.topic(victim, protocol.CMD), cmd) == not_authorized
    assert a.publish(protocol.topic("cam-a", protocol.STATE), state("cam-a")) == "Success"  # its own: fine

    # the controller's desired and cmd for b reach b only
    fleet.link.publish_cmd("cam-b", protocol.Cmd(id="real", kind="ping"))
    wait_for(lambda: any(t.endswith("/cam-b/cmd") for t, _ in b.got), what="b's command")
    wait_for(lambda: client.devices(), what="a registered")
    time.sleep(1.0)  # give a stray delivery every chance to arrive before asserting there was none
    assert not [t for t, _ in a.got if "/cam-b/" in t or t.startswith("$SYS")], a.got
    assert not [t for t, _ in other.got]
    # b and the controller were not disconnected by a's client ids; nothing was recorded for b or cam-new
    assert b.connected.is_set() and not b.disconnects and fleet.link.connected
    assert [d["id"] for d in client.devices()] == ["cam-a"]
    assert fleet.link.received >= 1 and not any("cam-b" in r for r in fleet.link.invalid)
    for c in (a, b, other):
        c.close()


def test_an_oversized_packet_disconnects_its_sender(fleet, tmp_path):
    from fleet.broker import MAX_PACKET_SIZE

    a = Client(fleet, issue_tls(fleet.pki, "cam-a", tmp_path, fleet.store))
    a.c.publish(protocol.topic("cam-a", protocol.EVENTS), b"x" * (MAX_PACKET_SIZE + 1), qos=1)
    wait_for(lambda: a.disconnects, what="the broker to disconnect the sender")
    assert "Packet too large" in a.disconnects[0] or "error" in a.disconnects[0].lower()
    assert fleet.link.connected and fleet_client(fleet).devices() == []
    a.close()


# -- enrollment ----------------------------------------------------------------------------------------------------


def test_enrollment_tokens_are_one_time_expiring_and_bound_to_their_device(fleet, tmp_path):
    fp = fleet.pki.ca_fingerprint
    token = fleet.enrollment.create_token(device_id="cam-1")
    assert token["token"] not in json.dumps(fleet.store.enrollments())  # stored hashed only
    with pytest.raises(identity.IdentityError, match="enrolls 'cam-1', not 'cam-2'"):  # another device's token
        identity.enroll(tmp_path / "cam-2", fleet.http_url, token["token"], fp, device_id="cam-2")
    ident = identity.enroll(tmp_path / "cam-1", fleet.http_url, token["token"], fp)  # the refusal did not use it up
    assert ident.device_id == "cam-1" and ident.broker == fleet.public_broker
    with pytest.raises(identity.IdentityError, match="already used"):  # reused
        identity.enroll(tmp_path / "again", fleet.http_url, token["token"], fp)
    expired = fleet.enrollment.create_token(device_id="cam-3")
    with fleet.store.tx() as db:  # an hour later (the token's ttl): the clock moved, nothing else did
        db.execute("UPDATE enrollments SET expires = ? WHERE id = ?", (time.time() - 1, expired["id"]))
    with pytest.raises(identity.IdentityError, match="expired"):
        identity.enroll(tmp_path / "cam-3", fleet.http_url, expired["token"], fp)
    with pytest.raises(identity.IdentityError, match="not an edgefleet enrollment token"):
        identity.enroll(tmp_path / "cam-4", fleet.http_url, "guess", fp)
    # a controller whose CA is not the pinned one is refused before the token is sent
    with pytest.raises(identity.IdentityError, match="refusing it"):
        identity.enroll(tmp_path / "cam-5", fleet.http_url, "efe_whatever", "ab" * 32)
    assert not (tmp_path / "cam-5" / "identity" / "enrollment.json").exists()
    # only cam-1 holds a certificate; the refused attempts left no device and no identity behind
    assert fleet.store.enrolled_ids() == {"cam-1"}
    for d in ("cam-2", "again", "cam-3", "cam-4"):
        assert not (tmp_path / d / "identity" / "enrollment.json").exists()
    key = next((tmp_path / "cam-1" / "identity").glob("device-*.key"))
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "cam-1" / "identity").stat().st_mode & 0o777 == 0o700


def test_enroll_commands_print_what_the_device_needs_and_refuse_bad_input(fleet, tmp_path, capsys):
    from edgefleet.cli import main
    from util import cli_args

    assert main(["fleet", "enroll", "cam-7", "--ttl", "10m", *cli_args(fleet)]) == 0
    out = capsys.readouterr().out
    assert "edgefleet agent enroll --controller" in out and fleet.pki.ca_fingerprint in out
    token = next(line.split()[0] for line in out.splitlines()[1:2])
    cfg = tmp_path / "agent.toml"
    trust_dir = tmp_path / "trust"
    cfg.write_text(f'state_dir = "{tmp_path / "cam-7"}"\ntrust_dir = "{trust_dir}"\n')
    enroll_args = ["agent", "enroll", "--controller", fleet.http_url, "--token", token, "--ca-fingerprint",
                   ":".join(fleet.pki.ca_fingerprint[i:i + 2] for i in range(0, 64, 2)).upper(), "--config", str(cfg)]
    not_a_key = tmp_path / "cam.key"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\n")
    assert main([*enroll_args, "--trust", str(release_pub()), "--trust", str(not_a_key)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a PEM public key" in err, err
    assert not trust_dir.exists()  # refused before anything was written or the token spent
    assert main([*enroll_args, "--trust", str(release_pub())]) == 0
    captured = capsys.readouterr()
    kid = signing.load_public(release_pub()).keyid
    assert "enrolled as cam-7" in captured.out and f"trusts release key tests ({kid})" in captured.out
    assert (trust_dir / "tests.pub").read_bytes() == release_pub().read_bytes()
    assert "refuse every bundle" not in captured.err
    assert main(["agent", "enroll", "--controller", fleet.http_url, "--token", token, "--ca-fingerprint",
                 fleet.pki.ca_fingerprint, "--config", str(cfg)]) == 2
    assert "already enrolled as cam-7" in capsys.readouterr().err
    bare = tmp_path / "bare.toml"  # enrolled without --trust: it says the device will refuse every bundle
    bare.write_text(f'state_dir = "{tmp_path / "cam-9"}"\ntrust_dir = "{tmp_path / "none"}"\n')
    assert main(["fleet", "enroll", "cam-9", *cli_args(fleet)]) == 0
    token9 = capsys.readouterr().out.splitlines()[1].split()[0]
    assert main(["agent", "enroll", "--controller", fleet.http_url, "--token", token9, "--ca-fingerprint",
                 fleet.pki.ca_fingerprint, "--config", str(bare)]) == 0
    assert "trusts no release key, so it will refuse every bundle" in capsys.readouterr().err
    for argv, needle in ((["fleet", "enroll", "Cam/1"], "device_id"), (["fleet", "enroll", "cam-8", "--ttl", "1s"],
                                                                           "ttl"),
                         (["fleet", "provision", "--count", "0"], "count"),
                         (["fleet", "revoke", "nobody"], "unknown device 'nobody'")):
        assert main([*argv, *cli_args(fleet)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


# -- revocation -----------------------------------------------------------------------------------------------------


def test_a_revoked_device_is_disconnected_and_stays_out(fleet, tmp_path):
    cfg = agent_config(fleet, tmp_path / "cam-1", "cam-1", api="127.0.0.1:0")
    agent = Agent(cfg)
    agent.start()
    client = fleet_client(fleet)
    try:
        wait_for(lambda: client.devices() and client.devices()[0]["online"], what="cam-1 online")
        ident = agent.identity
        doc = client.revoke("cam-1")
        assert doc["revoked_certificates"]
        wait_for(lambda: not agent.link.connected, what="the broker to drop cam-1")
        time.sleep(2.5)  # its reconnects (every second or two) are refused by the CRL
        assert not agent.link.connected
        with pytest.raises(transport.TransportError, match="refused our certificate|closed the connection"):
            transport.probe(transport.parse_url(fleet.broker_url), ident.tls)
        with pytest.raises(identity.IdentityError, match="401"):  # renewal refused
            identity.renew(ident)
        # whatever it still manages to send is ignored; a later one-time token can admit it again
        assert not fleet.enrollment.is_enrolled("cam-1")
        crl = fleet.pki.crl.read_bytes()
        from cryptography import x509

        revoked = {r.serial_number for r in x509.load_pem_x509_crl(crl)}
        assert int(doc["revoked_certificates"][0], 16) in revoked
        assert "user cam-1\ntopic deny #" in fleet.broker.acl_path.read_text()
    finally:
        agent.stop()
    enroll(fleet, tmp_path / "cam-1b", "cam-1")  # an administrator's new token re-admits the id
    assert fleet.enrollment.is_enrolled("cam-1") and "cam-1" not in fleet.store.revoked_device_ids()


# -- renewal ------------------------------------------------------------------------------------------------------


def test_the_agent_renews_its_certificate_before_it_expires(tmp_path):
    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0", cert_lifetime_s=600).start_background()
    try:
        cfg = agent_config(fleet, tmp_path / "cam-1", "cam-1", api="127.0.0.1:0")
        first = identity.Identity.load(tmp_path / "cam-1")
        agent = Agent(cfg)
        agent.RENEW_CHECK_S = 0.2
        agent.start()
        try:
            wait_for(lambda: agent.identity.cert_file != first.cert_file, what="the renewal")
            kinds = sorted(c["kind"] for c in fleet.store.certificates("cam-1"))
            assert kinds == ["enroll", "renew"] or kinds[:2] == ["enroll", "renew"]
            assert not (first.root / first.key_file).exists()  # the old key is gone from the device
        finally:
            agent.stop()
        again = Agent(cfg)  # a restart: the new identity
        again.start()
        try:
            assert again.identity.cert_file != first.cert_file and again.link.wait_connected(TIMEOUT)
        finally:
            again.stop()
    finally:
        fleet.stop()


# -- images and clones ---------------------------------------------------------------------------------------------


def test_first_boot_provisioning_from_one_image(fleet, tmp_path):
    token = fleet.enrollment.create_token(count=2, prefix="cam-", ttl_s=600)
    (tmp_path / "provision.token").write_text(token["token"] + "\n")

    def image(name: str, device_id: str):
        from agent.config import AgentConfig, validate

        return validate(AgentConfig(state_dir=str(tmp_path / name), api="127.0.0.1:0", device_id=device_id,
                                    controller=fleet.http_url, ca_fingerprint=token["ca_fingerprint"],
                                    provision_token_file=str(tmp_path / "provision.token")))

    def enrolled(agent: Agent) -> Agent:
        agent.start()  # serves at once; enrolls in the background
        wait_for(lambda: agent.identity is not None or agent.enrollment_error, what="the first-boot enrollment")
        return agent

    first = enrolled(Agent(image("one", "cam-{random}")))
    refused = []
    try:
        assert first.config.device_id.startswith("cam-") and first.identity is not None
        assert first.link.wait_connected(TIMEOUT) and first.status()["enrollment"] == "enrolled"
        # a second device made from the same image, whose id came out the same (a copied machine id): refused,
        # and it says so (and keeps trying: an administrator may revoke the other or give it a new token)
        same = enrolled(Agent(image("two", first.config.device_id)))
        refused.append(same)
        assert "already enrolled by another device" in same.enrollment_error
        assert same.status()["enrollment"] == "pending" and same.link is None
        assert not (tmp_path / "two" / "identity" / "enrollment.json").exists()
        refused.append(enrolled(Agent(image("three", "gate-{random}"))))
        assert "starting with 'cam-'" in refused[-1].enrollment_error
        second = enrolled(Agent(image("four", "cam-{random}")))
        second.stop()
        refused.append(enrolled(Agent(image("five", "cam-{random}"))))
        assert "used" in refused[-1].enrollment_error  # its two uses are gone
    finally:
        first.stop()
        for a in refused:
            a.stop()
    assert len(fleet.store.enrolled_ids()) == 2


def test_one_identity_on_two_devices_is_a_loud_conflict(fleet, tmp_path):
    """An enrolled device's state dir copied to a second device (an image cloned after enrollment): both
    connect with one certificate, the broker hands the session back and forth, and the controller says so."""
    cfg = agent_config(fleet, tmp_path / "cam-1", "cam-1", api="127.0.0.1:0", telemetry_interval_s=0.5)
    shutil.copytree(tmp_path / "cam-1", tmp_path / "clone")
    from agent.config import AgentConfig, validate

    clone_cfg = validate(AgentConfig(state_dir=str(tmp_path / "clone"), api="127.0.0.1:0", telemetry_interval_s=0.5))
    client = fleet_client(fleet)
    one, two = Agent(cfg), Agent(clone_cfg)
    one.start()
    wait_for(lambda: client.devices(), what="cam-1")
    assert client.health("cam-1")["identity_conflict"] is None
    two.start()
    try:
        h = wait_for(lambda: (x := client.health("cam-1"))["identity_conflict"] and x, timeout=60,
                     what="the conflict to show")
        conflict = h["identity_conflict"]
        assert {one.boot_id, two.boot_id} <= set(conflict["boot_ids"]) and conflict["takeovers"] >= 1
        assert any(e["kind"] == "identity_conflict" and "two devices use the identity cam-1" in e["reason"]
                   for e in h["events"])
        from prometheus_client.parser import text_string_to_metric_families
        import urllib.request

        from util import bearer, ssl_context

        req = urllib.request.Request(fleet.http_url + "/metrics", headers=bearer(fleet))
        with urllib.request.urlopen(req, context=ssl_context(fleet), timeout=30) as r:
            samples = {s.name: s for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
        assert samples["edgefleet_device_identity_conflict"].value == 1
        for page in ("/", "/devices/cam-1"):  # and loudly on the dashboard
            req = urllib.request.Request(fleet.http_url + page, headers=bearer(fleet))
            with urllib.request.urlopen(req, context=ssl_context(fleet), timeout=30) as r:
                html = r.read().decode()
            assert 'id="conflicts"' in html and "Two devices, one identity" in html and one.boot_id in html
        assert samples["edgefleet_identity_conflicts"].value == 1
    finally:
        one.stop()
        two.stop()


def test_bundles_are_served_to_enrolled_devices_and_operators_only(fleet, tmp_path, bundles):
    import urllib.error
    import urllib.request

    sha = fleet_client(fleet).upload_bundle(bundles["v1"])["sha256"]
    url = f"{fleet.http_url}/bundles/{sha}"

    def get(tls: transport.Tls | None = None, headers: dict | None = None) -> int:
        ctx = (tls or transport.Tls(str(fleet.pki.ca_crt))).context()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), context=ctx,
                                        timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    device = identity.Identity.load(enroll(fleet, tmp_path / "cam-1", "cam-1").root.parent)
    assert get(device.tls) == 200  # an enrolled device, by its client certificate
    assert get() == 401  # nobody
    from util import bearer

    read = fleet_client(fleet).create_token("read", "reader")["token"]
    assert get(headers=bearer(fleet, read)) == 403 and get(headers=bearer(fleet)) == 200
    other = PKI(tmp_path / "other-ca").ensure(["localhost"])  # a certificate from another CA: no handshake
    foreign = issue_tls(other, "cam-1", tmp_path / "foreign")
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # TLS 1.3: refused just after the handshake
        get(transport.Tls(str(fleet.pki.ca_crt), foreign.cert, foreign.key))
    fleet_client(fleet).revoke("cam-1")
    assert get(device.tls) == 401  # revoked: its downloads stop at once


def test_insecure_mode_is_plaintext_and_says_so(tmp_path):
    """`fleet serve --insecure` (never the default): plaintext MQTT and HTTP, an anonymous broker, no identities;
    an agent must say insecure = true to use it, and the controller warns on stderr."""
    import subprocess
    import sys

    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0", insecure=True).start_background()
    try:
        assert fleet.http_url.startswith("http://") and fleet.broker_url.startswith("mqtt://") and fleet.pki is None
        from agent.config import AgentConfig, ConfigError, validate

        with pytest.raises(ConfigError, match="plaintext"):
            validate(AgentConfig(state_dir=str(tmp_path / "d"), device_id="cam-1", broker=fleet.broker_url,
                                 controller=fleet.http_url))
        agent = Agent(validate(AgentConfig(state_dir=str(tmp_path / "d"), device_id="cam-1", broker=fleet.broker_url,
                                           controller=fleet.http_url, insecure=True, api="127.0.0.1:0")))
        agent.start()
        try:
            wait_for(lambda: fleet_client(fleet).devices(), what="the insecure agent")
        finally:
            agent.stop()
    finally:
        fleet.stop()
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "fleet", "serve", "--data", str(tmp_path / "cli"),
                             "--http", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--insecure"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("edgefleet fleet: serving http://")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "WARNING: --insecure: plaintext MQTT and HTTP" in err
