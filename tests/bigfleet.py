"""A registered fleet of N devices in a real store, made fast: each device's state and one telemetry window go
through the store's own ``record_*`` methods (the protocol messages a device sends), without a broker.

Used by tests/test_reads_scale.py (sizes at 10k devices) and bench/reads.py (sizes and times, before/after).
Deterministic: device i's model, version, tags, latency and errors depend on i only.
"""

from __future__ import annotations

import time

from agent import protocol

MODELS = ("detector", "classifier", "segmenter", "ocr", "keyword")
VERSIONS = ("1.0.0", "1.1.0", "2.0.0")
SITES = ("site-a", "site-b", "site-c", "site-d")
SILENT_S = 2 * 86400.0  # every tenth device's silence
OFFLINE_AFTER = 1000  # the store's offline_after to give (intervals of 10 s): the others stay online for hours


def device_id(i: int) -> str:
    return f"dev-{i:06d}"


def populate(store, n: int, now: float | None = None, tags: bool = True, batch: int = 500) -> list[str]:
    """Register devices dev-000000 .. dev-{n-1}: a state and a telemetry window each (a tenth of them silent
    long enough to be offline in a store with ``offline_after=OFFLINE_AFTER``; some with errors), stored as the
    controller's link stores a stream (``record_many``, ``batch`` devices a transaction), and tags ``site-*`` and
    ``cams``/``mics``. Returns the ids."""
    now = time.time() if now is None else now
    ids = [device_id(i) for i in range(n)]
    for start in range(0, n, batch):
        items = []
        for i in range(start, min(n, start + batch)):
            m = MODELS[i % len(MODELS)]
            v = VERSIONS[(i // len(MODELS)) % len(VERSIONS)]
            active = protocol.ActiveModel(name=m, version=v, sha256=f"{i % 15:02x}" * 32, runtime="onnxruntime",
                                          precision="int8")
            sent = now - (SILENT_S if i % 10 == 9 else 5.0)  # every tenth one silent for two days: offline
            p50 = 2.0 + (i % 97) / 10
            items.append((protocol.State(device_id=ids[i], online=True, time=sent, boot_id="b1",
                                         agent_version="0.9.0", arch="x86_64", runtimes=["onnxruntime"],
                                         active=active), sent, False))
            items.append((protocol.Telemetry(
                device_id=ids[i], boot_id="b1", seq=1, time=sent, interval_s=10.0, inferences=100 + i % 50,
                errors={"decode": i % 7} if i % 7 else {},
                latency_ms=protocol.Latency(p50=p50, p95=p50 * 2, p99=p50 * 3, max=p50 * 4, mean=p50),
                active=active, cpu_percent=float(i % 100), rss_bytes=50_000_000 + i, memory_percent=float(i % 90),
                disk_free_bytes=10**9, temperature_c=40.0 + i % 30), sent, False))
        store.record_many(items)
    if tags:
        for i, did in enumerate(ids):
            store.set_tags(did, add=[SITES[i % len(SITES)], "cams" if i % 2 else "mics"])
    return ids
