"""The ``percentile`` calibrator: clip the range at a percentile of the observed values."""

from __future__ import annotations

from ortq.core.hookspecs import hookimpl
from ortq.core.scheme import QuantSpec
from ortq.core.histogram import HistogramCalibrator, HistogramStatistic
from ortq.core.options import option_bool, option_float


class PercentileCalibrator(HistogramCalibrator):
    """Cut off the rarest values: the range keeps the central ``percentile`` percent of them.

    Use it when a few outliers (a handful of huge activations in a few samples) would otherwise stretch
    the range and waste most quantization levels; it is simple and predictable, and the knob says
    directly how much of the data may be clipped: ``100 - percentile`` percent in all, half on each side,
    as ONNX Runtime's percentile calibrator reads the same option (so ``CalibPercentile`` means the same in
    both). On data without outliers it stays close to min/max. ``percentile=100`` is min/max.

    Options (strings from the CLI are accepted): ``percentile`` (default 99.999, in [50, 100]) and
    ``symmetric`` (default false): clip ``|x|`` at its percentile and use ``[-t, t]``, or ``[0, t]`` for a
    tensor that never went negative. ``guard`` (default true): a range with more expected error than min/max
    is replaced by min/max, and the top of logits is kept (see :class:`ortq.core.histogram.HistogramCalibrator`);
    ``guard=false`` clips exactly at the percentile, as ONNX Runtime does. Statistics are exact streaming histograms
    (:class:`ortq.core.histogram.HistogramStatistic`), so the result does not depend on batch order or size;
    quantiles are interpolated inside a bin and exact to within one bin width.
    """

    name = "percentile"
    description = "clip at a percentile of the values (default 99.999), from an exact streaming histogram"

    def __init__(self, percentile: float = 99.999, symmetric: bool = False, guard: bool = True) -> None:
        self.percentile = option_float("percentile", percentile, 50.0, 100.0)
        self.symmetric = option_bool("symmetric", symmetric)
        self.guard = option_bool("guard", guard)

    def range_from_histogram(self, tensor: str, hist: HistogramStatistic, spec: QuantSpec) -> tuple[float, float]:
        assert hist.min is not None and hist.max is not None
        p = self.percentile / 100.0
        if self.symmetric:
            t = hist.abs_quantile(p)
            return (0.0 if hist.min >= 0.0 else -t), t
        tail = (1.0 - p) / 2.0
        lo, hi = hist.quantile(tail), hist.quantile(1.0 - tail)
        return lo, max(lo, hi)


@hookimpl
def ortq_register_calibrators(register):
    register(PercentileCalibrator)
