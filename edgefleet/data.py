"""Real inputs, offline: crops of printed text from scikit-image's bundled ``page()`` photo, and crops of its
bundled photos for ImageNet classifiers (``photo_crops``).

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



# scikit-image's bundled photos (no download): scenes, objects, an animal, textures, a portrait, a telescope image
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry",
          "moon", "clock", "retina", "grass", "gravel", "brick")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def photo_crops(n: int = 200, seed: int = 0, size: int = 224) -> np.ndarray:
    """``n`` real photo crops for ImageNet classifiers, float32 [n, 3, size, size] (NCHW), normalised with the
    ImageNet mean/std. Photo ``i % 14`` of ``PHOTOS`` (grey ones repeated on 3 channels), a square of 40-100 %
    of its shorter side at a random place, flipped left-right half the time, resized to ``size``; the same
    ``seed`` gives the same array. The photos take turns, so the last samples (held out by the converter)
    show every photo too."""
    import skimage.data
    from skimage.transform import resize

    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        photos.append(np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3])
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[y0 : y0 + side, x0 : x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = resize(crop, (size, size), anti_aliasing=True, preserve_range=True) / 255.0
        out[i] = (crop.astype(np.float32).transpose(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    return out
