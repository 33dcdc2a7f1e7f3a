"""Ground truth from the device's applications: every served inference gets a request id, and a label sent for it
(``POST /v1/feedback``) is joined to the prediction kept here, into its bundle's confusion counts (issue 12).

- **The ring.** The last ``size`` predictions (config ``feedback_buffer``, default 1024): request id -> the
  bundle's ``metrics.ModelQuality``, the predicted class bin of its profile's first classifier output (one per
  row of the request), when it was made, whether it has a label. An older one is overwritten: its id is then
  unknown. Memory is fixed: a few hundred bytes a prediction.
- **Ids.** 16 hex digits (64 random bits from the OS, ``secrets``): unique in practice, and not guessable from
  another application's ids.
- **A label** is the true class index (0 .. n_classes - 1) of the model's first classifier output, or, for a
  request of N rows, a list of N of them. It is folded to its class bin the way served outputs are
  (``quality.class_index``: the profile's classes one by one, every other class into "other") and counted in
  the bundle's confusion matrix [true bin, predicted bin].
- **Refusals**, each counted by reason in the window's ``Feedback.refused`` (of the prediction's bundle when it
  is known, else of the active one) and answered with a 4xx: ``unknown_id`` (never issued, or overwritten),
  ``expired`` (older than ``feedback_ttl_s``), ``duplicate`` (it has a label already), ``other_model`` (the
  bundle that made it is no longer loaded on this device), ``no_classifier`` (its model has no classifier
  output in a profile), ``label_out_of_range``, ``bad_request`` (not an id and an integer label), ``flood``
  (more than ``feedback_max_per_window`` labels offered in one telemetry window).
- **A label for a prediction of the previous bundle** (an update came between the prediction and its label) is
  counted for that bundle, in a quality message under its own sha256, while it is still loaded (the agent
  keeps the previous bundle for an instant rollback); once it has been unloaded, ``other_model``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from agent.errors import EdgefleetError

MAX_BODY = 64 << 10  # bytes of one POST /v1/feedback
MAX_ITEMS = 1000  # labels in one request's {"labels": [...]}
# the HTTP status of each refusal
STATUS = {"unknown_id": 404, "expired": 410, "duplicate": 409, "other_model": 409, "no_classifier": 422,
          "label_out_of_range": 422, "bad_request": 400, "flood": 429}


class FeedbackError(EdgefleetError):
    """A request body that is not feedback at all (HTTP 400)."""


class Refused(EdgefleetError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Prediction:
    __slots__ = ("quality", "bins", "at", "labeled")

    def __init__(self, quality, bins: tuple[int, ...] | None, at: float) -> None:
        self.quality, self.bins, self.at, self.labeled = quality, bins, at, False


def parse(body: bytes) -> tuple[list[tuple[object, object]], bool]:
    """The (id, label) items of a request body, and whether it was the list form. Raises FeedbackError."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise FeedbackError(f"the body is not JSON ({str(e).splitlines()[0][:200]}): send "
                            f'{{"id": "<X-Request-Id of the inference>", "label": <class index>}}') from None
    if isinstance(doc, dict) and "labels" in doc and set(doc) == {"labels"}:
        items = doc["labels"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
            raise FeedbackError(f'"labels" must be a list of 1 to {MAX_ITEMS} {{"id", "label"}} objects')
        return [(i.get("id"), i.get("label")) if isinstance(i, dict) else (None, None) for i in items], True
    if isinstance(doc, dict) and set(doc) == {"id", "label"}:
        return [(doc["id"], doc["label"])], False
    raise FeedbackError('the body must be {"id": "<X-Request-Id>", "label": <class index>} or '
                        '{"labels": [{"id": ..., "label": ...}, ...]}')


def _is_label(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class FeedbackBook:
    """The ring of recent predictions and the per-window flood limit. Thread-safe. ``clock``: seconds, monotonic
    (a test may pass its own)."""

    def __init__(self, size: int = 1024, ttl_s: float = 3600.0, max_per_window: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl_s, self.max_per_window = size, ttl_s, max_per_window
        self.clock = clock
        self._lock = threading.Lock()
        self._ring: OrderedDict[str, _Prediction] = OrderedDict()
        self._offered = 0  # labels offered in this telemetry window (flood limit)

    def issue(self, quality, bins: tuple[int, ...] | None) -> str:
        """A new request id for a prediction of the bundle whose window is ``quality`` (None: it has no profile)."""
        rid = secrets.token_hex(8)
        entry = _Prediction(quality, bins, self.clock())
        with self._lock:
            self._ring[rid] = entry
            if len(self._ring) > self.size:
                self._ring.popitem(last=False)
        return rid

    def new_window(self) -> None:
        with self._lock:
            self._offered = 0

    def label(self, rid: object, label: object, active) -> None:
        """Join ``label`` to prediction ``rid``; raises Refused (counted, by reason, in the prediction's bundle's
        window, else in ``active``'s: the ModelQuality of the bundle serving now, or None)."""
        with self._lock:
            self._offered += 1
            flood = self._offered > self.max_per_window
            entry = self._ring.get(rid) if isinstance(rid, str) else None
            try:
                self._check(rid, label, entry, flood)
            except Refused as e:
                where = entry.quality if entry is not None and entry.quality is not None and \
                    e.reason not in ("other_model", "flood") else active
                if where is not None:
                    where.refuse(e.reason)
                raise
            entry.labeled = True
        q, labels = entry.quality, label if isinstance(label, list) else [label]
        for true, predicted in zip(labels, entry.bins):
            q.joined(int(q.index[true]), predicted)

    def _check(self, rid, label, entry: _Prediction | None, flood: bool) -> None:
        if flood:
            raise Refused("flood", f"more than {self.max_per_window} labels in this telemetry window "
                                   f"(feedback_max_per_window): refused until the next one")
        if not isinstance(rid, str) or not (_is_label(label) or (isinstance(label, list) and label and
                                                                 all(_is_label(x) for x in label))):
            raise Refused("bad_request", 'a label is {"id": "<X-Request-Id>", "label": <class index>} (a list of '
                                         'class indices for a request of several rows)')
        if entry is None:
            raise Refused("unknown_id", f"no prediction with id {rid[:40]!r}: never issued, or overwritten (the "
                                        f"agent keeps the last {self.size}, feedback_buffer)")
        age = self.clock() - entry.at
        if age > self.ttl_s:
            raise Refused("expired", f"prediction {rid} is {age:.0f} s old; labels are taken for {self.ttl_s:g} s "
                                     f"(feedback_ttl_s)")
        if entry.labeled:
            raise Refused("duplicate", f"prediction {rid} has a label already")
        q = entry.quality
        if q is not None and q.closed:
            raise Refused("other_model", f"prediction {rid} was made by bundle {q.sha[:12]}, which is no longer "
                                         f"loaded on this device")
        if q is None or q.classifier is None or entry.bins is None:
            raise Refused("no_classifier", f"the model that made prediction {rid} has no classifier output in a "
                                           f"profile.json: labels cannot be joined to it")
        labels = label if isinstance(label, list) else [label]
        if len(labels) != len(entry.bins):
            raise Refused("bad_request", f"prediction {rid} has {len(entry.bins)} rows: send "
                                         f"{'one class index' if len(entry.bins) == 1 else f'a list of {len(entry.bins)}'}")
        n = q.classifier.n_classes
        bad = next((x for x in labels if not 0 <= x < n), None)
        if bad is not None:
            raise Refused("label_out_of_range", f"label {bad} is not a class of the model (0..{n - 1})")
