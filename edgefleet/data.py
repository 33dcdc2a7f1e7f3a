"""Real inputs, offline: crops of printed text from scikit-image's bundled ``page()`` photo.

For the PP-OCR text-direction classifier: each crop is a piece of a real text line, preprocessed
the way RapidOCR does it (height 48, width up to 192, zero-padded, scaled to [-1, 1]); half are
turned by 180°, labelled 1. The fp32 model gets about 95 % of them right.
"""

from __future__ import annotations

import numpy as np

INPUT = "x"  # the classifier's input name


def _lines(page: np.ndarray, ink: np.ndarray) -> list[tuple[int, int]]:
    rows = ink.sum(1) > max(3, 0.02 * page.shape[1])
    spans, y = [], 0
    while y < len(rows):
        if rows[y]:
            y0 = y
            while y < len(rows) and rows[y]:
                y += 1
            if y - y0 >= 8:
                spans.append((max(0, y0 - 3), min(len(rows), y + 3)))
        y += 1
    return spans


def _prep(crop: np.ndarray) -> np.ndarray:
    from skimage.transform import resize

    h, w = crop.shape
    width = min(192, int(round(48 * w / h)))
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :width] = (resize(crop, (48, width), anti_aliasing=True).astype(np.float32) - 0.5) / 0.5
    return out


def text_direction(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` real text crops, float32 [n, 3, 48, 192], and labels (0 upright, 1 turned 180°)."""
    import skimage.data
    from skimage.filters import threshold_sauvola

    page = skimage.data.page()
    ink = page < threshold_sauvola(page, window_size=25)
    crops = []
    for y0, y1 in _lines(page, ink):
        h = y1 - y0
        for x in range(0, page.shape[1] - 2 * h, h):
            for widths in (3, 4, 6):
                w = widths * h
                if x + w > page.shape[1] or ink[y0:y1, x : x + w].mean() < 0.05:
                    continue
                crop = page[y0:y1, x : x + w]
                crops += [(_prep(crop), 0), (_prep(crop[::-1, ::-1]), 1)]
    order = np.random.default_rng(seed).permutation(len(crops))
    if n is not None:
        order = order[:n]
    x = np.stack([crops[i][0] for i in order])
    labels = np.array([crops[i][1] for i in order], dtype=np.int64)
    return x, labels

