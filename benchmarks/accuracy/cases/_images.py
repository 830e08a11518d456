"""Real photographs for the vision cases, and deterministic crops of them.

Sources: every colour or grey photograph that scikit-image ships inside its wheel (``skimage.data``; the
ones it would download with pooch are not used) and scikit-learn's two sample images. More samples are
derived by random crops (30-100 % of the shorter side, aspect 3:4 to 4:3), horizontal flips and rescaling;
calibration and evaluation use different random streams, so no crop is shared, but both draw on the same
source photographs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (name, loader) pairs; loaded lazily so that importing costs nothing.
_SKIMAGE = ["astronaut", "chelsea", "coffee", "rocket", "camera", "clock", "coins", "moon", "hubble_deep_field",
            "immunohistochemistry", "retina", "brick", "grass", "gravel", "page", "text", "colorwheel", "logo",
            "horse"]


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:  # RGBA on white
        a = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def photos() -> list[tuple[str, np.ndarray]]:
    """All source photographs as HxWx3 uint8 RGB, in a fixed order."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = [(n, _rgb(getattr(data, n)())) for n in _SKIMAGE]
    left, right, _ = data.stereo_motorcycle()
    out += [("motorcycle_left", _rgb(left)), ("motorcycle_right", _rgb(right))]
    sk = load_sample_images()
    out += [(Path(n).stem, _rgb(im)) for n, im in zip(sk.filenames, sk.images)]
    return out


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.transform import resize as _resize

    return (_resize(img, (h, w), order=1, anti_aliasing=True, preserve_range=True) + 0.5).clip(0, 255).astype(np.uint8)


def crops(n: int, seed: int, size: tuple[int, int] | None = None, min_scale: float = 0.3,
          sources: list[tuple[str, np.ndarray]] | None = None) -> list[tuple[str, np.ndarray]]:
    """``n`` random crops cycling over the sources; each is resized to ``size`` (H, W) when given.

    The first pass over the sources takes each photograph whole (no crop) when ``seed`` is even, so the
    calibration set (even seed) sees every photograph once at full view.
    """
    rng = np.random.default_rng(seed)
    sources = sources if sources is not None else photos()
    out = []
    for i in range(n):
        name, img = sources[i % len(sources)]
        H, W = img.shape[:2]
        if i < len(sources) and seed % 2 == 0:
            crop = img
        else:
            side = rng.uniform(min_scale, 1.0) * min(H, W)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            h = int(min(H, side * np.sqrt(aspect)))
            w = int(min(W, side / np.sqrt(aspect)))
            y = int(rng.integers(0, H - h + 1))
            x = int(rng.integers(0, W - w + 1))
            crop = img[y:y + h, x:x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if size is not None:
            crop = resize(crop, *size)
        out.append((name, np.ascontiguousarray(crop)))
    return out
