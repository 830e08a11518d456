"""The ``mse`` calibrator: the clipping threshold with the least expected squared quantization error."""

from __future__ import annotations

import numpy as np

from ortq.core.hookspecs import hookimpl
from ortq.core.scheme import QuantSpec
from ortq.core.histogram import HistogramCalibrator, HistogramStatistic, quantization_steps
from ortq.core.options import option_bool


class MseCalibrator(HistogramCalibrator):
    """Minimize the expected squared error that quantization adds to the tensor, rounding plus clipping.

    For every bin edge ``t`` of the ``|x|`` histogram, the error is the rounding noise of the values
    inside (``n * step**2 / 12`` with the step the scheme gets for the range the threshold gives) plus the
    clipping error of the values beyond (``sum n_c (|c| - t)**2`` over bin centers ``c``); all thresholds
    are evaluated at once with cumulative sums, and the smallest error wins. Use it when the tensor's
    values matter in proportion to their size (regression outputs, residual streams, anything fed to an
    Add or MatMul): it trades resolution against clipping directly, without a tuning knob, and it stays
    at min/max when the data has no tail worth clipping.

    Option: ``symmetric`` (default false) returns ``[-t, t]`` (``[0, t]`` for a tensor that never went
    negative) instead of clamping the threshold to the observed extremes.
    ``guard`` (default true): see :class:`ortq.core.histogram.HistogramCalibrator`.
    """

    name = "mse"
    description = "threshold minimizing expected squared quantization error, from an exact streaming histogram"

    def __init__(self, symmetric: bool = False, guard: bool = True) -> None:
        self.symmetric = option_bool("symmetric", symmetric)
        self.guard = option_bool("guard", guard)

    def range_from_histogram(self, tensor: str, hist: HistogramStatistic, spec: QuantSpec) -> tuple[float, float]:
        assert hist.min is not None and hist.max is not None
        lo, hi = hist.min, hist.max
        folded = hist.folded()
        nonzero = np.flatnonzero(folded)
        if nonzero.size == 0:
            return (0.0, 0.0) if self.symmetric else (lo, hi)
        used = int(nonzero[-1]) + 1
        w = hist.width
        n = folded[:used].astype(np.float64)
        c = (np.arange(used) + 0.5) * w
        t = np.arange(1, used + 1) * w  # candidate j clips at the upper edge of bin j - 1
        inside = np.cumsum(n)  # values below t
        # tail[j] = sums over bins >= j + 1, i.e. the bins beyond candidate t[j]
        s0 = _tail(n)
        s1 = _tail(n * c)
        s2 = _tail(n * c * c)
        clipping = np.maximum(s2 - 2.0 * t * s1 + t * t * s0, 0.0)
        steps, _ = quantization_steps(spec, one_sided=lo >= 0.0)
        if self.symmetric:  # the range returned for each candidate, widened to include 0
            range_lo, range_hi = (np.zeros_like(t) if lo >= 0.0 else -t), t
        else:
            range_lo = np.minimum(0.0, np.maximum(lo, -t))
            range_hi = np.maximum(0.0, np.minimum(hi, t))
        if spec.symmetric:
            step = 2.0 * np.maximum(-range_lo, range_hi) / steps
        else:
            step = (range_hi - range_lo) / steps
        error = inside * step * step / 12.0 + clipping
        best = min(float(t[int(np.argmin(error))]), hist.absmax)
        if self.symmetric:
            return (0.0 if lo >= 0.0 else -best), best
        return max(lo, -best), min(hi, best)


def _tail(values: np.ndarray) -> np.ndarray:
    """``out[j] = values[j + 1:].sum()``."""
    rev = np.cumsum(values[::-1])[::-1]
    return np.concatenate((rev[1:], [0.0]))


@hookimpl
def ortq_register_calibrators(register):
    register(MseCalibrator)
