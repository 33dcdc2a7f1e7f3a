"""The agent's one MQTT link: birth state and last will, desired/cmd in, telemetry/events out.

paho-mqtt 2.x, the idiomatic way: VERSION2 callbacks, a retained last will, connect_async +
loop_start, subscribe inside on_connect (so a reconnect resubscribes), QoS 1 out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent import protocol
from agent.errors import EdgefleetError

log = logging.getLogger("edgefleet.agent.link")


class BrokerUnreachable(EdgefleetError):
    pass


class Link:
    def __init__(
        self,
        device_id: str,
        broker: tuple[str, int],
        *,
        keepalive: int,
        birth: Callable[[], protocol.State],
        on_desired: Callable[[protocol.Desired], None],
        on_cmd: Callable[[protocol.Cmd], None],
    ) -> None:
        import paho.mqtt.client as mqtt

        self.device_id = device_id
        self.broker = broker
        self._birth = birth
        self._on_desired = on_desired
        self._on_cmd = on_cmd
        self._connected = threading.Event()
        self._stopping = False
        self._failed: str | None = None
        self.dropped: dict[str, int] = {}  # invalid messages received, by reason
        self._c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-agent-{device_id}",
            protocol=mqtt.MQTTv311,
            clean_session=False,  # the broker keeps our subscriptions and queued cmds while we are away
        )
        self._keepalive = keepalive
        self._c.max_queued_messages_set(0)  # queue QoS 1 publishes while disconnected
        self._c.reconnect_delay_set(1, 30)
        will = protocol.State(device_id=device_id, online=False, time=0.0)
        self._c.will_set(protocol.topic(device_id, protocol.STATE), protocol.encode(will), qos=1, retain=True)
        self._c.on_connect = self._connected_cb
        self._c.on_connect_fail = self._connect_fail_cb
        self._c.on_disconnect = self._disconnect_cb
        self._c.on_message = self._message_cb

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        """Connect; raise BrokerUnreachable with the reason when the first attempt fails."""
        host, port = self.broker
        url = f"mqtt://{host}:{port}"
        try:
            self._c.connect(host, port, keepalive=self._keepalive)
        except OSError as e:
            raise BrokerUnreachable(f"cannot reach broker {url}: {e.strerror or e}") from None
        self._c.loop_start()
        if not self._connected.wait(timeout):
            self._c.loop_stop()
            raise BrokerUnreachable(f"broker {url} did not accept the connection: {self._failed or 'timed out'}")

    def publish(self, kind: str, msg: protocol.Message, retain: bool = False):
        return self._c.publish(protocol.topic(self.device_id, kind), protocol.encode(msg), qos=1, retain=retain)

    def publish_state(self) -> None:
        self.publish(protocol.STATE, self._birth(), retain=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye (retained offline state; a clean disconnect sends no will), then disconnect."""
        self._stopping = True
        if self.connected:
            info = self.publish(protocol.STATE, protocol.State(
                device_id=self.device_id, online=False, time=protocol.now(), boot_id=self._birth().boot_id),
                retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self._c.disconnect()
        self._c.loop_stop()

    # --- paho callbacks (on paho's thread): never raise ---------------------------------------
    def _connected_cb(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failed = str(reason_code)
            log.warning("broker refused the connection: %s", reason_code)
            return
        client.subscribe([(protocol.topic(self.device_id, protocol.DESIRED), 1),
                          (protocol.topic(self.device_id, protocol.CMD), 1)])
        self.publish_state()
        self._connected.set()
        log.info("connected to mqtt://%s:%d", *self.broker)

    def _connect_fail_cb(self, client, userdata) -> None:
        self._failed = "connection failed"

    def _disconnect_cb(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting", reason_code)
        self._connected.clear()

    def _message_cb(self, client, userdata, message) -> None:
        try:
            _, kind = protocol.parse_topic(message.topic)
            if not message.payload:  # a cleared retained message
                return
            msg = protocol.decode(kind, message.payload)
            if kind == protocol.DESIRED:
                self._on_desired(msg)
            elif kind == protocol.CMD:
                self._on_cmd(msg)
        except protocol.ProtocolError as e:
            reason = str(e)
            if reason not in self.dropped:
                log.warning("dropped an invalid message on %s: %s", message.topic, reason)
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        except Exception:  # a bug in a handler must not kill the network thread
            log.exception("handling %s failed", message.topic)
