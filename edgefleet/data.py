"""Real inputs, offline: crops of printed text from scikit-image's bundled ``page()`` photo, speech, and crops
of its bundled photos for ImageNet classifiers (``photo_crops``).

For the PP-OCR text-direction classifier: each crop is a piece of a real text line, preprocessed
the way RapidOCR does it (height 48, width up to 192, zero-padded, scaled to [-1, 1]); half are
turned by 180°, labelled 1. The fp32 model gets about 95 % of them right. For the PP-OCRv4 recognizer:
the same crops at width 320. For Silero VAD: sentences spoken by Debian's ``espeak-ng``, in 512-sample
windows at 16 kHz, each a complete feed with the model's recurrent state.
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


def _prep(crop: np.ndarray, max_width: int = 192) -> np.ndarray:
    from skimage.transform import resize

    h, w = crop.shape
    width = min(max_width, int(round(48 * w / h)))
    out = np.zeros((3, 48, max_width), np.float32)
    out[:, :, :width] = (resize(crop, (48, width), anti_aliasing=True).astype(np.float32) - 0.5) / 0.5
    return out


def _crops() -> list[np.ndarray]:
    """Pieces of real text lines of ``page()`` (3, 4 and 6 line-heights wide), grey, as they appear."""
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
                crops.append(page[y0:y1, x : x + w])
    return crops


def text_direction(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` real text crops, float32 [n, 3, 48, 192], and labels (0 upright, 1 turned 180°)."""
    crops = []
    for crop in _crops():
        crops += [(_prep(crop), 0), (_prep(crop[::-1, ::-1]), 1)]
    order = np.random.default_rng(seed).permutation(len(crops))
    if n is not None:
        order = order[:n]
    x = np.stack([crops[i][0] for i in order])
    labels = np.array([crops[i][1] for i in order], dtype=np.int64)
    return x, labels



def text_lines(n: int | None = None, width: int = 320, seed: int = 0) -> np.ndarray:
    """Up to ``n`` real text-line crops for the PP-OCRv4 recognizer, float32 [n, 3, 48, width]: pieces of
    ``page()``'s lines resized to height 48 (aspect kept, at most ``width`` wide), scaled to [-1, 1] and
    zero-padded on the right, as RapidOCR feeds its recognizer."""
    crops = [_prep(crop, width) for crop in _crops()]
    order = np.random.default_rng(seed).permutation(len(crops))
    if n is not None:
        order = order[:n]
    return np.stack([crops[i] for i in order])


SPEECH = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run the model close to the microphone.",
    "Please say the number seven, then wait for the tone.",
    "A voice activity detector tells speech from silence.",
    "Rain is expected in the north by late afternoon.",
)
VAD_RATE = 16000
VAD_WINDOW = 512  # new samples per Silero VAD call at 16 kHz ...
VAD_CONTEXT = 64  # ... after the last 64 of the previous window (silero_vad.utils_vad.OnnxWrapper does the same)


def speech(seconds_of_silence: float = 0.6) -> np.ndarray:
    """Real speech: Debian's ``espeak-ng`` speaks :data:`SPEECH`, with silence between the sentences;
    float32 mono in [-1, 1] at 16 kHz. Raises ``RuntimeError`` if espeak-ng is not installed."""
    import shutil
    import subprocess
    import tempfile
    import wave
    from pathlib import Path

    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    gap = np.zeros(int(seconds_of_silence * VAD_RATE), np.float32)
    parts = [gap]
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(SPEECH):
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, capture_output=True)
            with wave.open(str(wav)) as w:
                rate, frames = w.getframerate(), w.readframes(w.getnframes())
            audio = np.frombuffer(frames, np.int16).astype(np.float32) / 32768
            parts += [resample_poly(audio, VAD_RATE, rate).astype(np.float32), gap]
    return np.concatenate(parts)


def vad_feeds(model, audio: np.ndarray | None = None, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """Complete Silero VAD feeds over real speech, one per 512-sample window, each exactly as the model takes
    it: ``input`` f32[1, 576] (64 samples of context + the window), ``state`` f32[2, 1, 128] (the state the fp32 model, run over the audio in ONNX
    Runtime, carries into that window; batch on axis 1) and ``sr`` an int64 scalar. ``model`` is the path of
    the ONNX file."""
    import onnxruntime as ort

    audio = speech() if audio is None else audio
    windows = len(audio) // VAD_WINDOW if n is None else min(n, len(audio) // VAD_WINDOW)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(VAD_RATE, np.int64)
    feeds = []
    for i in range(windows):
        start = i * VAD_WINDOW
        chunk = np.concatenate([audio[max(0, start - VAD_CONTEXT) : start] if i else np.zeros(VAD_CONTEXT, np.float32),
                                audio[start : start + VAD_WINDOW]])[None, :]
        feeds.append({"input": np.ascontiguousarray(chunk), "state": state, "sr": sr})
        _, state = session.run(["output", "stateN"], feeds[-1])
    return feeds


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
