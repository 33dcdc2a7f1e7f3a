"""A hostile `desired`, against a real agent's Updater, ModelStore and outbox on a real state dir.

Each attack names a real bundle (its true sha256 and size where the attack needs them), served by real HTTP
servers on 127.0.0.1, so that without its defence the attack would go through: the agent would fetch from
where it was told, write where the sha256 points, or delete what it names. With the defences each is
refused before anything is read or written: no request reaches any server, downloads/ and models/ stay
empty, the victim directory beside the state dir is intact, and the agent queues one `failed` event that
names the field (and only ids that are themselves valid).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import msgspec
import pytest
from util import release_key, release_pub, wait_for

from agent import protocol
from agent.config import AgentConfig, ConfigError, validate
from agent.daemon import Agent
from agent.store import ModelStore
from agent.updater import Policy, Refused, check_desired


class Server:
    """A real HTTP server on 127.0.0.1 serving files from a directory, with redirects, counting requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle(bundles):
    """A real, loadable bundle: (path, sha256, size)."""
    path = bundles["v1"]
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size


def _serving(tmp_path, name, bundle):
    root = tmp_path / name
    (root / "bundles").mkdir(parents=True)
    shutil.copy(bundle[0], root / "bundles" / bundle[1])
    return Server(root)


@pytest.fixture
def controller(tmp_path, bundle):
    s = _serving(tmp_path, "controller", bundle)
    yield s
    s.close()


@pytest.fixture
def evil(tmp_path, bundle):
    s = _serving(tmp_path, "evil", bundle)
    yield s
    s.close()


@pytest.fixture
def victim(tmp_path):
    """A directory beside the state dir that nothing the agent does may touch."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "precious.txt").write_text("still here")
    return d


def _make_agent(tmp_path, controller, **kw):
    # The updater's policy is the same whatever the transport: these servers speak plain HTTP, so the agent
    # is configured insecure (it never connects anywhere); the test through a real broker below is secure.
    cfg = validate(AgentConfig(device_id="cam-1", broker="mqtt://127.0.0.1:1", controller=controller.url,
                               state_dir=str(tmp_path / "state"), rollback_window_s=0, insecure=True,
                               trust_dir=str(release_key()[1]), **kw))
    a = Agent(cfg)  # built, not started: the updater is driven by hand, the outbox read back
    a.store.open()
    a.outbox.open()
    return a


@pytest.fixture
def agent(tmp_path, controller):
    a = _make_agent(tmp_path, controller)
    yield a
    a.outbox.close()


def _events(agent) -> list[protocol.Event]:
    """What the agent queued for the controller, decoded with the contract the controller applies."""
    return [protocol.decode(m.kind, m.payload) for m in agent.outbox.pending(1000)]


def _desired(bundle, url, **kw) -> protocol.Desired:
    fields = dict(deployment_id="dep-attack", name="ocr-cls", version="1", url=url, sha256=bundle[1], size=bundle[2])
    fields.update(kw)
    return protocol.Desired(**fields)


def _assert_untouched(agent, victim, *servers):
    assert list(agent.store.downloads.iterdir()) == []
    assert list(agent.store.models.iterdir()) == []
    assert (victim / "precious.txt").read_text() == "still here"
    assert [s.requests for s in servers] == [[] for _ in servers], "nothing may be read for a refused desired"


def _assert_one_refusal(agent, field: str, sha256: str | None, deployment_id: str | None = "dep-attack"):
    events = _events(agent)
    assert [e.kind for e in events] == ["failed"], [(e.kind, e.reason) for e in events]
    assert field in events[0].reason
    assert (events[0].sha256, events[0].deployment_id) == (sha256, deployment_id)
    return events[0].reason


# --- sha256: joined into paths, so anything but 64 lowercase hex is refused at every layer ------------------

BAD_SHAS = ["dot-dot", "63 hex", "uppercase"]


def _bad_sha(case, sha):
    return {"dot-dot": "../../victim", "63 hex": sha[:63], "uppercase": sha.upper()}[case]


@pytest.mark.parametrize("case", BAD_SHAS)
def test_a_bad_sha256_is_refused_by_decoding(bundle, controller, case):
    payload = protocol.encode(_desired(bundle, f"{controller.url}/bundles/{bundle[1]}",
                                       sha256=_bad_sha(case, bundle[1])))
    with pytest.raises(protocol.ProtocolError, match=r"\$\.sha256"):
        protocol.decode(protocol.DESIRED, payload)


@pytest.mark.parametrize("case", BAD_SHAS)
def test_a_bad_sha256_given_straight_to_the_updater_is_refused_before_any_read_or_write(
        agent, bundle, controller, victim, case):
    sha = _bad_sha(case, bundle[1])
    agent.updater.apply(_desired(bundle, f"{controller.url}/bundles/{bundle[1]}", sha256=sha))
    _assert_untouched(agent, victim, controller)
    _assert_one_refusal(agent, "$.sha256", sha256=None)
    assert agent.engine.current is None


@pytest.mark.parametrize("case", BAD_SHAS)
def test_the_store_refuses_a_bad_sha256_in_every_method_that_makes_a_path(agent, bundle, victim, case):
    store: ModelStore = agent.store
    sha = _bad_sha(case, bundle[1])
    (store.models / "x").mkdir()  # so that models/../../victim resolves beside the state dir
    calls = {
        "download": lambda: store.download("http://127.0.0.1:9/x", sha, 10),
        "verify_download": lambda: store.verify_download(sha, 10),
        "unpack": lambda: store.unpack(sha, bundle[0]),
        "discard": lambda: store.discard(sha),
        "activate": lambda: store.activate(sha, "dep-1"),
        "switch": lambda: store.switch(sha),
        "record_active": lambda: store.record_active(sha, "dep-1", True),
    }
    for name, call in calls.items():
        with pytest.raises(protocol.ProtocolError, match="invalid sha256"):
            call()
    assert (victim / "precious.txt").read_text() == "still here"
    assert list(store.downloads.iterdir()) == [] and [p.name for p in store.models.iterdir()] == ["x"]
    assert not (store.root / "current").exists() and not (store.root / "active.json").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:,root:x:0:0", "ftp://127.0.0.1:9/x"])
def test_the_store_itself_downloads_only_over_http(agent, bundle, url):
    """Behind the policy, the store refuses what urllib would otherwise open without a network."""
    from agent.errors import EdgefleetError

    with pytest.raises(EdgefleetError, match="not an http\\(s\\) URL"):
        agent.store.download(url, bundle[1], bundle[2])
    assert list(agent.store.downloads.iterdir()) == []


def test_discard_never_follows_a_link_out_of_models(agent, bundle, victim):
    store: ModelStore = agent.store
    (store.models / bundle[1]).symlink_to(victim, target_is_directory=True)
    store.discard(bundle[1])
    assert not (store.models / bundle[1]).is_symlink()
    assert (victim / "precious.txt").read_text() == "still here"


# --- the URL: http(s) on the controller's origin (or bundle_origins), nothing else -------------------------

SMALL = b"a data: URL is read without any network; this is what it would write"


def _url_attacks(bundle, controller, evil):
    port = controller.url.rsplit(":", 1)[1]
    return {
        "file": f"file://{bundle[0]}",
        "data": f"data:application/x-tar;base64,{base64.b64encode(SMALL).decode()}",  # fits the 2048 bound
        "ftp": f"ftp://127.0.0.1:{port}/bundles/{bundle[1]}",
        "foreign port": f"{evil.url}/bundles/{bundle[1]}",
        "foreign host": f"http://localhost:{evil.url.rsplit(':', 1)[1]}/bundles/{bundle[1]}",
        "userinfo": f"http://127.0.0.1:{port}@127.0.0.1:{evil.url.rsplit(':', 1)[1]}/bundles/{bundle[1]}",
        "https downgrade": f"https://127.0.0.1:{port}/bundles/{bundle[1]}",
        "backslash": f"{evil.url}\\@127.0.0.1:{port}/bundles/{bundle[1]}",
    }


URL_CASES = ["file", "data", "ftp", "foreign port", "foreign host", "userinfo", "https downgrade", "backslash"]


@pytest.mark.parametrize("case", URL_CASES)
def test_a_url_off_the_controllers_origin_is_refused_before_any_read_or_write(
        agent, bundle, controller, evil, victim, case):
    url = _url_attacks(bundle, controller, evil)[case]
    if case == "data":  # what it holds, truly: without the check the agent would download and verify it
        bundle = (None, hashlib.sha256(SMALL).hexdigest(), len(SMALL))
    agent.updater.apply(_desired(bundle, url))
    _assert_untouched(agent, victim, controller, evil)
    reason = _assert_one_refusal(agent, "desired.url", sha256=bundle[1])
    assert len(reason) <= protocol.MAX_REASON
    assert agent.engine.current is None


def test_the_refusal_names_the_url_and_the_origin(agent, bundle, controller, evil):
    with pytest.raises(Refused) as e:
        check_desired(_desired(bundle, f"{evil.url}/bundles/x"), agent.updater.policy)
    assert str(e.value) == (f"desired.url: {evil.url}/bundles/x is not on the controller's origin "
                            f"{controller.url}")


def test_a_redirect_off_the_controllers_origin_is_refused_before_it_is_followed(
        agent, bundle, controller, evil, victim):
    controller.redirects["/bundles/moved"] = f"{evil.url}/bundles/{bundle[1]}"
    agent.updater.apply(_desired(bundle, f"{controller.url}/bundles/moved"))
    assert controller.requests == ["/bundles/moved"] and evil.requests == []
    assert list(agent.store.downloads.iterdir()) == [] and list(agent.store.models.iterdir()) == []
    assert (victim / "precious.txt").read_text() == "still here"
    events = _events(agent)
    assert [e.kind for e in events] == ["downloading", "failed"]
    assert "desired.url redirects to" in events[1].reason and evil.url in events[1].reason
    assert agent.engine.current is None


def test_a_size_over_max_bundle_bytes_is_refused_before_any_read_or_write(agent, bundle, controller, victim):
    ten_gib = 10 << 30
    desired = _desired(bundle, f"{controller.url}/bundles/{bundle[1]}", size=ten_gib)
    assert protocol.decode(protocol.DESIRED, protocol.encode(desired)).size == ten_gib  # the contract allows it
    agent.updater.apply(desired)
    _assert_untouched(agent, victim, controller)
    reason = _assert_one_refusal(agent, "desired.size", sha256=bundle[1])
    assert f"{ten_gib} bytes is more than max_bundle_bytes ({2 << 30})" in reason


def test_a_bundle_on_the_controllers_origin_or_a_listed_origin_is_applied(tmp_path, bundle, controller, evil):
    """The checks refuse only what they should: the same bundle from the controller, or from an origin the
    config lists, is downloaded, verified and activated."""
    a = _make_agent(tmp_path, controller, bundle_origins=[evil.url])
    try:
        a.updater.apply(_desired(bundle, f"{evil.url}/bundles/{bundle[1]}"))
        assert a.engine.current is not None and a.engine.current.sha == bundle[1]
        assert evil.requests == [f"/bundles/{bundle[1]}"]
        assert [e.kind for e in _events(a)] == ["downloading", "verifying", "activating", "active"]
    finally:
        a.outbox.close()


@pytest.mark.parametrize("origin, message", [
    ("ftp://127.0.0.1", "not an http(s)://HOST[:PORT] URL"),
    ("https://cdn.example/bundles", "without a path"),
    ("https://user@cdn.example", "user info"),
    ("https://cdn.example:99999", "not a valid URL"),
])
def test_bundle_origins_must_be_plain_origins(tmp_path, origin, message):
    with pytest.raises(ConfigError, match=rf"bundle_origins: .*{message[:10]}"):
        validate(AgentConfig(device_id="cam-1", broker="mqtts://127.0.0.1:1", controller="https://c.example",
                             state_dir=str(tmp_path), bundle_origins=[origin]))


def test_policy_origins_are_normalised(tmp_path):
    cfg = validate(AgentConfig(device_id="cam-1", broker="mqtts://127.0.0.1:1", controller="HTTPS://Fleet.Example/x",
                               state_dir=str(tmp_path), bundle_origins=["http://cdn.example"],
                               max_bundle_bytes=1000))
    policy = Policy.from_config(cfg)
    assert policy.origins == ("https://fleet.example:443", "http://cdn.example:80")
    policy.check_url("https://fleet.example:443/bundles/x")
    policy.check_url("https://FLEET.example/bundles/x")
    with pytest.raises(Refused, match="nor on bundle_origins http://cdn.example:80"):
        policy.check_url("http://fleet.example/bundles/x")
    with pytest.raises(ConfigError, match="max_bundle_bytes"):
        validate(msgspec.structs.replace(cfg, max_bundle_bytes=0))


# --- a desired that does not decode: a refusal the controller sees, once per payload -----------------------

@pytest.fixture
def fleet(tmp_path):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    yield f
    f.stop()


def test_an_undecodable_desired_is_reported_once_and_nothing_is_touched(tmp_path, fleet, free_port, victim):
    """Through the real broker: the retained bad desired comes back on every reconnect (here: another client
    takes over the agent's session, then leaves); the controller gets one `failed` event naming the field."""
    from util import agent_config, fleet_client, issue_tls

    from agent import transport

    cfg = agent_config(fleet, tmp_path / "state", "dev-1", api=f"127.0.0.1:{free_port}", telemetry_interval_s=3600)
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.link.wait_connected(60)  # start() does not wait for the broker
        wait_for(lambda: fleet_client(fleet).devices(), what="the device registered")
        bad = protocol.Desired(deployment_id="dep-evil", name="ocr-cls", version="1",
                               url=f"{fleet.http_url}/bundles/x", sha256="../../victim", size=10)
        fleet.link.publish_desired("dev-1", bad)  # a struct built in-process is not checked: it goes out as is

        def failed():
            return [e for e in fleet_client(fleet).health("dev-1")["events"] if e["kind"] == "failed"]

        events = wait_for(failed, what="the refusal at the controller")
        assert len(events) == 1
        assert "$.sha256" in events[0]["reason"]
        assert (events[0]["deployment_id"], events[0]["sha256"]) == ("dep-evil", None)
        reason = next(r for r in agent.link.dropped if "$.sha256" in r)
        seq = agent.outbox.last_seq

        # take the session over and give it back: the agent reconnects and the broker sends the retained
        # desired again
        url = transport.parse_url(fleet.broker_url)  # the intruder holds dev-1's certificate (a clone)
        intruder = transport.make_client(url, "whatever", issue_tls(fleet.pki, "dev-1", tmp_path / "clone"))
        intruder.connect(url.host, url.port, clean_start=False)
        intruder.loop_start()
        wait_for(lambda: not agent.link.connected, what="the takeover")
        intruder.disconnect()
        intruder.loop_stop()
        wait_for(lambda: agent.link.dropped[reason] >= 2, what="the retained desired to come back")
        assert agent.outbox.last_seq == seq, "the same refusal was queued again"
        assert list(agent.store.downloads.iterdir()) == [] and list(agent.store.models.iterdir()) == []
        assert (victim / "precious.txt").read_text() == "still here"
    finally:
        agent.stop()


def test_refuse_desired_queues_one_event_per_distinct_payload(agent):
    one = b'{"v": 1, "deployment_id": "dep-1", "sha256": "../../x"}'
    two = b'{"v": 1, "deployment_id": "dep-2", "sha256": "../../x"}'
    assert agent.refuse_desired(one, "invalid desired message: ... - at `$.sha256`") is True
    assert agent.refuse_desired(one, "invalid desired message: ... - at `$.sha256`") is False
    assert agent.refuse_desired(two, "invalid desired message: ... - at `$.sha256`") is True
    events = _events(agent)
    assert [(e.kind, e.deployment_id, e.sha256) for e in events] == [("failed", "dep-1", None),
                                                                     ("failed", "dep-2", None)]
    assert all("$.sha256" in e.reason for e in events)


def test_what_the_agent_builds_from_an_exception_stays_inside_the_contract(agent):
    agent._queue_error("x" * 100_000)
    agent._emit("failed", protocol.named(b"{}"), "y" * 100_000)
    assert [len(e.reason) for e in _events(agent)] == [protocol.MAX_REASON, protocol.MAX_REASON]
