"""agent/quality.py: the bins a bundle's reference profile and a device's served outputs share, and the statistics
over them, each against a value computed by hand (issue 12, step 1)."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from agent import quality


def test_psi_by_hand():
    # counts 50/50 -> 25/75, each bin + 0.5: shares 0.5/0.5 -> 25.5/101 and 75.5/101
    e, a = np.array([0.5, 0.5]), np.array([25.5, 75.5]) / 101
    want = float(((a - e) * np.log(a / e)).sum())
    assert quality.psi([50, 50], [25, 75]) == pytest.approx(want) == pytest.approx(0.268677, abs=1e-6)
    assert quality.psi([50, 50], [25, 75], smoothing=0) == pytest.approx(
        (0.25 - 0.5) * math.log(0.5) + 0.25 * math.log(1.5))  # unsmoothed: the textbook 0.274653
    assert quality.psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert quality.psi_band(0.05) == "stable" and quality.psi_band(0.2) == "moderate"
    assert quality.psi_band(0.2747) == "significant"
    # an empty bin is smoothed, not an infinite distance: 100/0 -> 50/50 is (1/202, 100.5/101 ...) by hand
    e, a = np.array([100.5, 0.5]) / 101, np.array([50.5, 50.5]) / 101
    assert quality.psi([100, 0], [50, 50]) == pytest.approx(float(((a - e) * np.log(a / e)).sum()))
    with pytest.raises(ValueError, match="no counts"):
        quality.psi([0, 0], [1, 1])


def test_drift_p_tells_sampling_noise_from_a_shift():
    # 50/50 vs 25/75 with 100 each: x = 0.268677 * 100 * 100 / 200 = 13.43 on 1 degree of freedom;
    # Wilson-Hilferty: z = ((x/1)^(1/3) - (1 - 2/9)) / sqrt(2/9)
    x = quality.psi([50, 50], [25, 75]) * 50
    z = (x ** (1 / 3) - 7 / 9) / math.sqrt(2 / 9)
    assert quality.drift_p([50, 50], [25, 75]) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert quality.drift_p([50, 50], [25, 75]) < 1e-3  # chi-square(1) tail at 13.4 is 2.5e-4
    # the same shift seen in 4 + 4 samples is noise: PSI is as large, p is not small
    d = quality.drift([2, 2], [1, 3])
    assert d.psi > 0.1 and d.p > 0.05 and d.band == "stable"
    d = quality.drift([500, 500], [250, 750])
    assert d.band == "significant" and d.p < 1e-10 and d.js == pytest.approx(quality.jensen_shannon([2, 2], [1, 3]))
    assert quality.drift_p([5, 5], [5, 5]) == 1.0


def test_jensen_shannon_by_hand():
    assert quality.jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert quality.jensen_shannon([3, 1], [3, 1]) == pytest.approx(0.0)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); KL(p||m) = log2(4/3), KL(q||m) = 1/2 log2(2/3) + 1/2 log2(2)
    want = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert quality.jensen_shannon([2, 0], [1, 1]) == pytest.approx(want)


def test_wilson_by_hand():
    lo, hi = quality.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook interval for 8 of 10
    assert quality.wilson(0, 0) == (0.0, 1.0)
    lo, hi = quality.wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 23.8416)


def test_scores_by_hand():
    # rows: true class, columns: predicted
    confusion = [[5, 1, 0],
                 [2, 3, 0],
                 [0, 0, 0]]  # class 2 never seen, never predicted
    s = quality.scores(confusion)
    assert s["accuracy"] == pytest.approx(8 / 11) and s["labels"] == 11
    c0, c1, c2 = s["per_class"]
    assert (c0["precision"], c0["recall"]) == (pytest.approx(5 / 7), pytest.approx(5 / 6))
    assert c0["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert (c1["precision"], c1["recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 5))
    assert c2 == {"class": 2, "precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0}
    assert s["macro"]["recall"] == pytest.approx((5 / 6 + 3 / 5) / 2)  # classes without data do not count
    assert s["accuracy_interval"] == quality.wilson(8, 11)
    with pytest.raises(ValueError, match="square"):
        quality.scores([[1, 2, 3]])


def test_classifier_profile_bins_by_hand():
    # 4 samples over 3 classes, as probabilities (kept as they are)
    p = np.array([[0.85, 0.1, 0.05],   # class 0, confidence 0.85 (bin 8), margin 0.75 (bin 7)
                  [0.55, 0.3, 0.15],   # class 0, confidence 0.55 (bin 5), margin 0.25 (bin 2)
                  [0.12, 0.73, 0.15],  # class 1, confidence 0.73 (bin 7), margin 0.58 (bin 5)
                  [1 / 3, 1 / 3, 1 / 3]], np.float32)  # class 0 (first of a tie), margin 0, entropy ln 3 (bin 9)
    prof = quality.build({"probs": p}, {"probs": "classifier"})
    o = prof.outputs[0]
    assert (o.kind, o.classes, o.n_classes, prof.samples) == ("classifier", [0, 1], 3, 4)  # by frequency
    assert o.counts["class"] == [3, 1, 0]  # class 0, class 1, every other class
    assert o.counts["confidence"] == [0, 0, 0, 1, 0, 1, 0, 1, 1, 0]  # 1/3 -> bin 3
    assert o.counts["margin"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    entropy = [-(row * np.log(row)).sum() / math.log(3) for row in p.astype(np.float64)]
    want = [0] * 10
    for e in entropy:
        want[min(int(e * 10), 9)] += 1
    assert o.counts["entropy"] == want and want[9] == 1


def test_classes_beyond_the_tracked_ones_are_folded():
    rng = np.random.default_rng(0)
    n_classes = quality.CLASS_BINS + 8
    labels = np.concatenate([np.arange(n_classes), np.zeros(10, np.int64)])  # class 0 the most frequent
    scores = np.full((len(labels), n_classes), -5.0, np.float32)
    scores[np.arange(len(labels)), labels] = 5.0
    prof = quality.build({"logits": scores}, {"logits": "classifier"})
    o = prof.outputs[0]
    assert len(o.classes) == quality.CLASS_BINS and o.classes[0] == 0
    assert len(o.counts["class"]) == quality.CLASS_BINS + 1
    assert o.counts["class"][0] == 11 and o.counts["class"][-1] == 8  # 8 classes share the last bin
    assert sum(o.counts["class"]) == len(labels)
    folder = quality.Folder(prof)
    untracked = next(c for c in range(n_classes) if c not in o.classes)
    one = np.full((1, n_classes), -5.0, np.float32)
    one[0, untracked] = 5.0
    folder.add({"logits": one})
    assert folder.counts["logits"]["class"][-1] == 1 and sum(folder.counts["logits"]["class"]) == 1
    del rng


def test_dense_profile_and_folding():
    ref = np.linspace(0.0, 1.0, 1001, dtype=np.float32).reshape(1, 1001)
    prof = quality.build({"map": ref}, {"map": "dense"})
    o = prof.outputs[0]
    assert o.kind == "dense" and len(o.edges) == quality.DENSE_BINS + 1
    assert o.edges[0] == pytest.approx(0.005) and o.edges[-1] == pytest.approx(0.995)
    assert sum(o.counts["value"]) == 1001 and len(o.counts["value"]) == quality.DENSE_BINS + 2
    folder = quality.Folder(prof)
    folder.add({"map": np.array([[-3.0, 0.45, 7.0, np.nan]], np.float32), "other": np.zeros(3)})
    counts = folder.take()["map"]["value"]
    assert counts[0] == 1 and counts[-1] == 1 and sum(counts) == 3  # under, one inside, over; NaN not counted
    assert counts[1 + int((0.45 - 0.005) / (0.99 / 16))] == 1
    assert sum(folder.counts["map"]["value"]) == 0  # take() starts a new window


def test_profile_id_names_the_bins_not_the_counts_and_round_trips():
    a = quality.build({"y": np.eye(3, dtype=np.float32)}, {"y": "classifier"})
    b = quality.build({"y": np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]}, {"y": "classifier"})
    assert a.outputs[0].counts != b.outputs[0].counts and a.id == b.id
    c = quality.build({"y": np.eye(4, dtype=np.float32)}, {"y": "classifier"})
    assert c.id != a.id
    again = msgspec.json.decode(msgspec.json.encode(a), type=quality.Profile)
    assert again == a and again.id == a.id


def test_drift_shows_between_two_scenes():
    """A folder fed outputs from another scene drifts past the 'significant' band; the same scene does not."""
    rng = np.random.default_rng(1)
    same = rng.normal(0, 1, (400, 10)).astype(np.float32)
    same[:, 3] += 3.0  # the reference scene: class 3 dominates
    prof = quality.build({"logits": same}, {"logits": "classifier"})
    o = prof.outputs[0]
    alike, other = quality.Folder(prof), quality.Folder(prof)
    again = rng.normal(0, 1, (400, 10)).astype(np.float32)
    again[:, 3] += 3.0
    alike.add({"logits": again})
    shifted = rng.normal(0, 1, (400, 10)).astype(np.float32)
    shifted[:, 7] += 3.0  # another scene: class 7
    other.add({"logits": shifted})
    assert quality.psi(o.counts["class"], alike.counts["logits"]["class"]) < quality.PSI_BANDS[0]
    drift = quality.psi(o.counts["class"], other.counts["logits"]["class"])
    assert quality.psi_band(drift) == "significant"
    assert quality.jensen_shannon(o.counts["class"], other.counts["logits"]["class"]) > 0.5


def test_probabilities_stay_probabilities_when_a_quantized_model_rounds_them():
    """The reference's softmax rows sum to 1; an int8 variant's dequantized ones to 1 +- a few thousandths. The
    profile decides once (from the reference) that the output holds probabilities, so the device's rounded rows are
    binned as probabilities too, not softmaxed again (which would put every 2-class confidence near 0.73)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (300, 2))
    ref = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prof = quality.build({"p": ref.astype(np.float32)}, {"p": "classifier"})
    assert prof.outputs[0].probabilities
    rounded = (np.round(ref * 255) / 255 * 1.004).astype(np.float32)  # int8-like steps, rows summing to ~1.004
    assert np.abs(rounded.sum(1) - 1).max() > 1e-3
    f = quality.Folder(prof)
    f.add({"p": rounded})
    for feature, counts in f.take()["p"].items():
        assert quality.drift(prof.outputs[0].counts[feature], counts).band == "stable", feature
    # scores (not probabilities) are softmaxed: the same logits give the same bins as their probabilities
    by_logits = quality.build({"s": logits.astype(np.float32)}, {"s": "classifier"})
    assert not by_logits.outputs[0].probabilities
    assert by_logits.outputs[0].counts == prof.outputs[0].counts
    assert by_logits.id != quality.build({"s": ref.astype(np.float32)}, {"s": "classifier"}).id
