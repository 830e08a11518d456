"""A streaming, exact, constant-memory histogram: the statistic behind the percentile, entropy and mse calibrators.

Layout. ``2 * half_bins`` bins of width ``w = 2**e`` (an integer exponent ``e``) cover ``[-R, R)`` with
``R = half_bins * w``; bin ``j`` holds ``[(j - half_bins) * w, (j - half_bins + 1) * w)``, so bin
``half_bins`` starts at exactly 0 and negative and positive values never share a bin.

Why powers of two. The first non-empty batch picks the smallest ``e`` whose range holds it. When a later
batch does not fit, the width doubles (as often as needed) instead of the histogram being re-binned: every
edge of the wider layout is an edge of the old one, so old bins ``2j, 2j+1`` add up exactly into one new
bin (the old histogram lands in the middle half of the new one). Nothing is interpolated, so the result is
the same whatever the batch order or batch sizes: exactly ``np.histogram`` of all values on the final
edges. The same argument makes :meth:`HistogramStatistic.merge` exact: two shards' histograms are brought
to the larger of their exponents and added. Memory stays ``2 * half_bins`` integers however many values
are observed, and the resolution is always between ``R / 2`` and ``R`` over ``half_bins`` bins for the
largest magnitude seen.

Speed. :meth:`HistogramStatistic.update` is the calibration hot path (tens of millions of values per
batch). Values are scaled by ``1/w`` (exact: a power of two), floored, shifted by ``half_bins`` (exact:
small integers in float32) and cast to int32, then counted by ``np.bincount``; this runs in chunks through
small per-thread scratch buffers that stay in cache, so neither time nor memory depends on how many
tensors are observed. When ``w > 1`` the scaling runs in float64 instead: in float32 a tiny negative
value could underflow to ``-0.0`` there and be counted on the wrong side of zero.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, ClassVar

import numpy as np

from ortq.core.calibrator import Calibrator, Statistic
from ortq.core.errors import CalibrationError

__all__ = [
    "HistogramStatistic",
    "HistogramCalibrator",
    "DEFAULT_HALF_BINS",
    "require_histogram",
    "quantization_steps",
    "range_error",
    "optimal_range",
]

_log = logging.getLogger(__name__)

DEFAULT_HALF_BINS = 2048
#: The smallest exponent: ``2**-E_MIN`` must stay a normal float32 so scaling by ``1/w`` is exact. An
#: all-zero first batch starts here; growth later is exact, so it costs no resolution.
E_MIN = -126
#: Values are binned in chunks of this many elements through per-thread scratch buffers (1 MiB).
_CHUNK = 1 << 17
_scratch = threading.local()


def _buffers(n: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread scratch: observers of different calibrations may run in different threads."""
    key = np.dtype(dtype).char
    bufs = getattr(_scratch, key, None)
    if bufs is None or bufs[0].size < n:
        bufs = (np.empty(max(n, 1024), dtype), np.empty(max(n, 1024), np.int32))
        setattr(_scratch, key, bufs)
    return bufs[0][:n], bufs[1][:n]


class HistogramStatistic(Statistic):
    """Exact streaming histogram of a tensor's values with power-of-two bin widths (see the module docs).

    Attributes: ``min``/``max`` (exact extremes, NaN if NaN was seen, None before any value), ``count``
    (values seen), ``batches`` (non-empty updates), ``exponent`` (``e``, None before any value) and
    ``counts`` (int64, ``2 * half_bins``). Once NaN or Inf is seen, :meth:`nonfinite` is True and nothing
    more is binned: the calibrators then refuse the tensor by name.
    """

    kind: ClassVar[str] = "histogram"

    def __init__(self, half_bins: int = DEFAULT_HALF_BINS) -> None:
        half_bins = int(half_bins)
        if not 8 <= half_bins <= 1 << 22:
            raise ValueError(f"half_bins must be in [8, {1 << 22}], got {half_bins}")
        self.half_bins = half_bins
        self.exponent: int | None = None
        self.counts = np.zeros(2 * half_bins, dtype=np.int64)
        self.min: float | None = None
        self.max: float | None = None
        self.count = 0
        self.batches = 0

    # -- layout ---------------------------------------------------------------------------------------
    @property
    def width(self) -> float:
        """Bin width ``w`` (0.0 before any value)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def limit(self) -> float:
        """``R``: the histogram covers ``[-R, R)``."""
        return self.half_bins * self.width

    def edges(self) -> np.ndarray:
        """The ``2 * half_bins + 1`` bin edges (float64, exact)."""
        return (np.arange(2 * self.half_bins + 1, dtype=np.float64) - self.half_bins) * self.width

    def folded(self) -> np.ndarray:
        """Counts of ``|x|`` over ``[k*w, (k+1)*w)``, ``k < half_bins``: negative bins mirrored onto positive ones.

        Bin ``[-(k+1)w, -kw)`` is added to ``[kw, (k+1)w)``: its ``|x|`` lie in ``(kw, (k+1)w]``, the same
        bin up to its edges.
        """
        h = self.half_bins
        return self.counts[h:] + self.counts[h - 1 :: -1]

    @property
    def absmax(self) -> float:
        if self.min is None or self.max is None:
            return 0.0
        return max(abs(self.min), abs(self.max))

    def nonfinite(self) -> bool:
        return self.min is not None and not (math.isfinite(self.min) and math.isfinite(self.max))

    def empty(self) -> bool:
        return self.exponent is None or self.min is None

    # -- quantiles --------------------------------------------------------------------------------------
    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``0 <= q <= 1``) of the values, interpolated linearly inside its bin.

        Positions follow ``np.percentile``'s linear method (``q * (n - 1)``, each bin's values taken as
        spread evenly over it); the result is clamped to ``[min, max]``, and ``q = 0`` / ``q = 1`` give
        exactly ``min`` / ``max``.
        """
        if self.empty() or self.nonfinite():
            return 0.0
        assert self.min is not None and self.max is not None
        first = -self.half_bins * self.width
        return _quantile(self.counts, first, self.width, q, self.min, self.max)

    def abs_quantile(self, q: float) -> float:
        """The ``q``-quantile of ``|x|`` (on :meth:`folded`), clamped to ``[0, max|x|]``."""
        if self.empty() or self.nonfinite():
            return 0.0
        lo = 0.0 if self.min is None or (self.min <= 0.0 <= self.max) else min(abs(self.min), abs(self.max))
        return _quantile(self.folded(), 0.0, self.width, q, lo, self.absmax)

    # -- updating ---------------------------------------------------------------------------------------
    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        if math.isnan(lo) or math.isnan(hi):
            lo = hi = float("nan")
        self._extend(lo, hi, int(x.size))
        if self.nonfinite():
            return
        self._fit(max(-lo, hi))
        assert self.exponent is not None
        h = self.half_bins
        # Scaling by 1/w is exact in float32 for w <= 1; for w > 1 a tiny value could underflow to -0.0
        # and land on the wrong side of zero, so wide ranges scale in float64 (about 20% slower).
        ftype = np.float32 if self.exponent <= 0 else np.float64
        inv = ftype(math.ldexp(1.0, -self.exponent))
        shift = ftype(h)
        counts = self.counts
        for start in range(0, x.size, _CHUNK):
            chunk = x[start : start + _CHUNK]
            f, idx = _buffers(chunk.size, ftype)
            np.multiply(chunk, inv, out=f)  # exact: a power of two, |x / w| < half_bins
            np.floor(f, out=f)
            np.add(f, shift, out=f)  # exact: integers below 2**24
            idx[...] = f
            counts += np.bincount(idx, minlength=2 * h)

    def _extend(self, lo: float, hi: float, n: int) -> None:
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = _nanmin(self.min, lo), _nanmax(self.max, hi)
        self.count += n
        self.batches += 1

    def _fit(self, absmax: float) -> None:
        """Pick the first exponent, or grow until ``absmax < R``."""
        e = _exponent_for(absmax, self.half_bins)
        if self.exponent is None:
            self.exponent = e
        elif e > self.exponent:
            self._grow(e - self.exponent)

    def _grow(self, k: int) -> None:
        """Double the bin width ``k`` times, merging old bins exactly into the new, wider ones."""
        assert self.exponent is not None
        self.counts = _coarsen(self.counts, self.half_bins, k)
        self.exponent += k

    # -- shards and persistence ------------------------------------------------------------------------
    def merge(self, other: Statistic) -> None:
        if not isinstance(other, HistogramStatistic):
            raise CalibrationError(f"cannot merge a {other.kind!r} statistic into a histogram")
        if other.half_bins != self.half_bins:
            raise CalibrationError(
                f"cannot merge histograms with {other.half_bins} and {self.half_bins} half bins"
            )
        if other.min is None or other.max is None:
            return
        self.min = other.min if self.min is None else _nanmin(self.min, other.min)
        self.max = other.max if self.max is None else _nanmax(self.max, other.max)
        self.count += other.count
        self.batches += other.batches
        if other.exponent is None:
            return
        if self.exponent is None:
            self.exponent, self.counts = other.exponent, other.counts.copy()
            return
        theirs = other.counts
        if other.exponent > self.exponent:
            self._grow(other.exponent - self.exponent)
        elif other.exponent < self.exponent:
            theirs = _coarsen(theirs, self.half_bins, self.exponent - other.exponent)
        self.counts = self.counts + theirs

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible and exact: ``counts`` lists the bins from ``first`` to the last non-empty one."""
        nonzero = np.flatnonzero(self.counts)
        first = int(nonzero[0]) if nonzero.size else 0
        last = int(nonzero[-1]) + 1 if nonzero.size else 0
        return {
            "kind": self.kind,
            "half_bins": self.half_bins,
            "exponent": self.exponent,
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "batches": self.batches,
            "first": first,
            "counts": [int(c) for c in self.counts[first:last]],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HistogramStatistic":
        """Rebuild from :meth:`to_dict`'s output; malformed data raises ``ValueError`` (nothing is executed)."""
        if not isinstance(data, dict) or data.get("kind", cls.kind) != cls.kind:
            raise ValueError("not a histogram statistic")
        stat = cls(int(data.get("half_bins", DEFAULT_HALF_BINS)))
        exponent = data.get("exponent")
        if exponent is not None:
            exponent = int(exponent)
            if not E_MIN <= exponent <= 128:
                raise ValueError(f"histogram exponent {exponent} outside [{E_MIN}, 128]")
        stat.exponent = exponent
        stat.min = None if data.get("min") is None else float(data["min"])
        stat.max = None if data.get("max") is None else float(data["max"])
        stat.count, stat.batches = int(data.get("count", 0)), int(data.get("batches", 0))
        raw = data.get("counts", [])
        if not isinstance(raw, list) or not all(isinstance(c, int) and 0 <= c < 1 << 62 for c in raw):
            raise ValueError("histogram counts must be a list of non-negative integers")
        first = int(data.get("first", 0))
        if first < 0 or first + len(raw) > stat.counts.size:
            raise ValueError(f"histogram counts (first {first}, {len(raw)} bins) do not fit {stat.counts.size} bins")
        stat.counts[first : first + len(raw)] = np.asarray(raw, dtype=np.int64)
        return stat

    def __repr__(self) -> str:
        return (
            f"HistogramStatistic(half_bins={self.half_bins}, exponent={self.exponent}, min={self.min}, "
            f"max={self.max}, count={self.count}, batches={self.batches})"
        )


def _exponent_for(absmax: float, half_bins: int) -> int:
    """The smallest ``e >= E_MIN`` with ``half_bins * 2**e > absmax``."""
    if not absmax > 0.0:
        return E_MIN
    e = max(E_MIN, math.frexp(absmax / half_bins)[1] - 1)
    while math.ldexp(half_bins, e) <= absmax:
        e += 1
    while e > E_MIN and math.ldexp(half_bins, e - 1) > absmax:
        e -= 1
    return e


def _coarsen(counts: np.ndarray, half_bins: int, k: int) -> np.ndarray:
    """Counts on a layout ``2**k`` times wider: old bin ``j`` goes to ``floor((j - H) / 2**k) + H``."""
    if k <= 0:
        return counts.copy()
    j = np.arange(counts.size, dtype=np.int64) - half_bins
    target = (j >> min(k, 62)) + half_bins  # arithmetic shift: floor division, exact for negatives
    out = np.zeros_like(counts)
    starts = np.flatnonzero(np.diff(target, prepend=target[0] - 1))
    out[target[starts]] = np.add.reduceat(counts, starts)
    return out


def _quantile(counts: np.ndarray, first_edge: float, width: float, q: float, lo: float, hi: float) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    total = int(counts.sum())
    if total == 0:
        return 0.0
    if q <= 0.0:
        return lo
    if q >= 1.0:
        return hi
    target = q * (total - 1) + 0.5  # np.percentile's position, each value the middle of its share
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, counts.size - 1)
    before = float(cum[i - 1]) if i > 0 else 0.0
    inside = float(counts[i])
    frac = (target - before) / inside if inside > 0 else 0.0
    value = first_edge + (i + frac) * width
    return float(min(max(value, lo), hi))


def _nanmin(a: float, b: float) -> float:
    return float("nan") if math.isnan(a) or math.isnan(b) else min(a, b)


def _nanmax(a: float, b: float) -> float:
    return float("nan") if math.isnan(a) or math.isnan(b) else max(a, b)


# -- helpers shared by the histogram calibrators ------------------------------------------------------------
def require_histogram(calibrator: str, tensor: str, statistic: Statistic) -> HistogramStatistic | None:
    """The statistic as a usable histogram, None if it never saw a value; raise a clear error otherwise."""
    if not isinstance(statistic, HistogramStatistic):
        kind = getattr(statistic, "kind", "") or type(statistic).__name__
        raise CalibrationError(
            f"calibrator {calibrator!r} needs a histogram of tensor {tensor!r} but was given a {kind!r} "
            "statistic (for example from a calibration state saved with another calibrator); recalibrate "
            "with a histogram calibrator (percentile, entropy or mse)"
        )
    if statistic.nonfinite():
        raise CalibrationError(
            f"tensor {tensor!r}: NaN or Inf reached it during calibration (observed range "
            f"[{statistic.min}, {statistic.max}]); calibrator {calibrator!r} cannot compute a range from it"
        )
    if statistic.empty():
        return None
    return statistic


class HistogramCalibrator(Calibrator):
    """Base for calibrators that reduce a :class:`HistogramStatistic` (percentile, entropy, mse, plugins).

    Subclasses implement :meth:`range_from_histogram`; the checks (wrong statistic kind, NaN/Inf, a
    tensor that never held a value) are done once, here, and so is the guard that keeps every clipping
    method from doing worse than min/max:

    - the maximum of a :attr:`tail_sensitive` tensor (logits, a Softmax input) is never clipped: the largest
      values there decide the answer, and a threshold method that sees them as rare outliers (the ``entropy``
      search on CTC logits) would flatten exactly the winning classes;
    - a range whose :func:`range_error` (expected squared error, rounding plus clipping, from the histogram) is
      larger than min/max's is replaced by min/max. A threshold that clips a fifth of an image's bright
      background (``entropy`` on a grayscale input: the bulk sits at the top, and KL divergence does not see how
      far values are moved) then cannot reach the model.

    A plugin that must return its own ranges unchecked sets ``guard = False`` (class or instance attribute).
    """

    statistic_types = (HistogramStatistic,)
    guard: bool = True

    def create_statistic(self, tensor: str) -> Statistic:
        return HistogramStatistic()

    def compute_range(self, tensor: str, statistic: Statistic, spec: Any) -> tuple[float, float]:
        hist = require_histogram(self.name, tensor, statistic)
        if hist is None:
            return 0.0, 0.0  # never saw a value (zero-size tensors): any scale represents it exactly
        lo, hi = self.range_from_histogram(tensor, hist, spec)
        if not self.guard:
            return lo, hi
        assert hist.min is not None and hist.max is not None
        if tensor in self.tail_sensitive and hi < hist.max:
            _log.debug("%s: tensor %r feeds a max-sensitive op or is an output; its maximum is kept", self.name, tensor)
            hi = hist.max
        if (lo, hi) != (hist.min, hist.max) and range_error(hist, lo, hi, spec) > range_error(
            hist, min(lo, hist.min), max(hi, hist.max), spec
        ):
            _log.debug("%s: range [%g, %g] of tensor %r has a larger expected error than min/max; using min/max",
                       self.name, lo, hi, tensor)
            if getattr(self, "symmetric", False):  # min/max in the form the calibrator was asked for
                return (0.0 if hist.min >= 0.0 else -hist.absmax), hist.absmax
            return hist.min, hist.max
        return lo, hi

    def range_from_histogram(self, tensor: str, hist: HistogramStatistic, spec: Any) -> tuple[float, float]:
        raise NotImplementedError


def quantization_steps(spec: Any, one_sided: bool) -> tuple[int, bool]:
    """``(qmax - qmin, both_sides)``: the integer steps of ``spec`` and whether a threshold ``t`` is spread
    over ``[-t, t]`` (two-sided data, or any symmetric scheme) rather than ``[0, t]``."""
    qmin, qmax = spec.qtype.qrange(symmetric=spec.symmetric, reduce_range=getattr(spec, "reduce_range", False))
    return int(qmax - qmin), bool(spec.symmetric or not one_sided)


# -- the error a range causes ---------------------------------------------------------------------------------
def _grid(spec: Any) -> tuple[int, bool]:
    qmin, qmax = spec.qtype.qrange(symmetric=spec.symmetric, reduce_range=getattr(spec, "reduce_range", False))
    return int(qmax - qmin), bool(spec.symmetric)


def _step(lo: np.ndarray | float, hi: np.ndarray | float, steps: int, symmetric: bool) -> np.ndarray:
    """The scale :func:`ortq.core.scheme.params_from_range` gives ``[lo, hi]`` (widened to include zero)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    return 2.0 * np.maximum(-lo, hi) / steps if symmetric else (hi - lo) / steps


def _bins(hist: HistogramStatistic) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Counts, edges and centers of the occupied bins, centers clamped to ``[min, max]``; and the count of
    the bin ``[0, w)``, which holds the exact zeros (after a ReLU, padding) that every grid represents."""
    assert hist.min is not None and hist.max is not None
    nonzero = np.flatnonzero(hist.counts)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    n = hist.counts[first:last].astype(np.float64)
    edges = (np.arange(first, last + 1, dtype=np.float64) - hist.half_bins) * hist.width
    centers = np.clip((edges[:-1] + edges[1:]) / 2.0, hist.min, hist.max)
    zeros = float(hist.counts[hist.half_bins]) if first <= hist.half_bins < last else 0.0
    return n, edges, centers, zeros


def range_error(hist: HistogramStatistic, lo: float, hi: float, spec: Any, clip_weight: float = 1.0) -> float:
    """Expected squared error, per value, that quantizing the observed values to ``[lo, hi]`` with ``spec`` adds.

    Values inside the range get the rounding noise of a uniform grid (``step**2 / 12``, except the bin of exact
    zeros); values beyond it are clipped (``(|x| - bound)**2``, at the bin's center), weighted by
    ``clip_weight``. This is the yardstick :func:`optimal_range` minimises and the guard of every histogram
    calibrator compares its choice with min/max by.
    """
    if hist.empty() or hist.nonfinite() or hist.count == 0:
        return 0.0
    n, _, c, zeros = _bins(hist)
    steps, symmetric = _grid(spec)
    above, below = c > hi, c < lo
    clipped = float(np.sum(n[above] * (c[above] - hi) ** 2) + np.sum(n[below] * (lo - c[below]) ** 2))
    inside = max(float(n[~above & ~below].sum()) - zeros, 0.0)
    step = float(_step(lo, hi, steps, symmetric))
    return (clip_weight * clipped + inside * step * step / 12.0) / float(n.sum())


def optimal_range(
    hist: HistogramStatistic, spec: Any, *, clip_weight: float = 1.0, keep_min: bool = False,
    keep_max: bool = False, rounds: int = 3,
) -> tuple[float, float]:
    """The range ``[lo, hi]`` with the least :func:`range_error`, each end searched on its own over every bin edge.

    Unlike a threshold on ``|x|`` (the ``mse`` calibrator), the two ends are chosen separately: a tensor with a
    long positive tail and a short negative one (Swish, GELU, logits) clips only where it pays. The search is
    coordinate descent from min/max (best ``hi`` for the current ``lo``, then the reverse, ``rounds`` times,
    each a vectorised pass over the edges with cumulative sums), so the result never has a larger error than
    min/max itself. ``keep_min`` / ``keep_max`` pin an end at the observed extreme: a tensor whose extremes
    carry the answer (logits, a Softmax input) must not lose its largest values.
    """
    assert hist.min is not None and hist.max is not None
    lo, hi = float(hist.min), float(hist.max)
    if hist.empty() or hist.count == 0 or lo == hi:
        return lo, hi
    n, edges, c, zeros = _bins(hist)
    steps, symmetric = _grid(spec)
    total = float(n.sum())
    # Candidate upper ends: positive inner edges, then the maximum (no clipping); the bins above edge k are k...
    up_k = np.flatnonzero((edges[1:-1] > 0.0) & (edges[1:-1] < hi)) + 1
    s0, s1, s2 = (np.concatenate((np.cumsum(v[::-1])[::-1], [0.0])) for v in (n, n * c, n * c * c))
    up_t = np.concatenate((edges[up_k], [hi]))
    up_n = np.concatenate((s0[up_k], [0.0]))
    up_err = np.concatenate((s2[up_k] - 2.0 * edges[up_k] * s1[up_k] + edges[up_k] ** 2 * s0[up_k], [0.0]))
    # ... and lower ends: negative inner edges, then the minimum; the bins below edge k are those before k.
    lo_k = np.flatnonzero((edges[1:-1] < 0.0) & (edges[1:-1] > lo)) + 1
    p0, p1, p2 = (np.concatenate(([0.0], np.cumsum(v))) for v in (n, n * c, n * c * c))
    lo_t = np.concatenate((edges[lo_k], [lo]))
    lo_n = np.concatenate((p0[lo_k], [0.0]))
    lo_err = np.concatenate((p2[lo_k] - 2.0 * edges[lo_k] * p1[lo_k] + edges[lo_k] ** 2 * p0[lo_k], [0.0]))
    up_err, lo_err = np.maximum(up_err, 0.0) * clip_weight, np.maximum(lo_err, 0.0) * clip_weight
    if keep_max:
        up_t, up_n, up_err = up_t[-1:], up_n[-1:], up_err[-1:]
    if keep_min:
        lo_t, lo_n, lo_err = lo_t[-1:], lo_n[-1:], lo_err[-1:]
    i, j = up_t.size - 1, lo_t.size - 1  # min/max

    def cost(ui: np.ndarray | int, li: np.ndarray | int) -> np.ndarray:
        step = _step(lo_t[li], up_t[ui], steps, symmetric)
        inside = np.maximum(total - up_n[ui] - lo_n[li] - zeros, 0.0)
        return up_err[ui] + lo_err[li] + inside * step * step / 12.0

    for _ in range(max(int(rounds), 1)):
        i_new = int(np.argmin(cost(np.arange(up_t.size), j)))
        j_new = int(np.argmin(cost(i_new, np.arange(lo_t.size))))
        if (i_new, j_new) == (i, j):
            break
        i, j = i_new, j_new
    return float(lo_t[j]), float(up_t[i])
