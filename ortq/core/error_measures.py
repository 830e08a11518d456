"""Numbers that say how close a quantized model stays to its float original."""

from __future__ import annotations

import numpy as np

__all__ = ["sqnr_db", "sqnr_from_sums", "max_abs_error", "top1_agreement", "cosine_similarity"]


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(actual, dtype=np.float64)) ** 2))
    return sqnr_from_sums(float(np.sum(ref**2)), noise)


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from sums of squares, for statistics streamed batch by batch: +inf without noise (identical),
    -inf without signal (all noise)."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(actual, np.float64)), initial=0.0))


def top1_agreement(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """Fraction of rows whose arg-max over the last axis agrees; None if there is no class axis."""
    ref, act = np.asarray(reference), np.asarray(actual)
    if ref.ndim < 2 or ref.shape[-1] < 2:
        return None
    return float(np.mean(ref.argmax(-1) == act.argmax(-1)))


def cosine_similarity(reference: np.ndarray, actual: np.ndarray) -> float:
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(actual, np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))
