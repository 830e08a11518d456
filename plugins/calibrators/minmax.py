"""The ``minmax`` calibrator: the observed extremes, optionally as a moving average over batches."""

from __future__ import annotations

from ortq.core.calibrator import Calibrator, MinMaxStatistic, Statistic
from ortq.core.hookspecs import hookimpl
from ortq.core.scheme import QuantSpec
from ortq.core.errors import CalibrationError
from ortq.core.histogram import HistogramStatistic
from ortq.core.options import option_bool, option_float


class MinMaxCalibrator(Calibrator):
    """Exact over all samples, which makes it sensitive to outliers; ``moving_average`` damps single batches.

    ``symmetric`` widens the range to [-max|x|, max|x|] (ONNX Runtime's CalibTensorRangeSymmetric).
    Histograms keep exact extremes too, so a state saved by a histogram calibrator serves min/max as well.
    """

    name = "minmax"
    description = "observed minimum and maximum (optionally a moving average of per-batch extremes)"
    statistic_types = (MinMaxStatistic, HistogramStatistic)

    def __init__(self, moving_average: bool = False, averaging_constant: float = 0.01, symmetric: bool = False) -> None:
        constant = option_float("averaging_constant", averaging_constant, 0.0, 1.0, lo_open=True)
        self.averaging_constant = constant if option_bool("moving_average", moving_average) else None
        self.symmetric = option_bool("symmetric", symmetric)

    def create_statistic(self, tensor: str) -> Statistic:
        return MinMaxStatistic(self.averaging_constant)

    def compute_range(self, tensor: str, statistic: Statistic, spec: QuantSpec) -> tuple[float, float]:
        if not isinstance(statistic, self.statistic_types):
            raise CalibrationError(f"tensor {tensor!r}: minmax cannot use a {statistic.kind!r} statistic")
        if statistic.min is None or statistic.max is None:
            return 0.0, 0.0  # never saw a value (zero-size tensors): any scale represents it exactly
        lo, hi = statistic.min, statistic.max
        if self.symmetric:
            bound = max(abs(lo), abs(hi))
            return -bound, bound
        return lo, hi


@hookimpl
def ortq_register_calibrators(register):
    register(MinMaxCalibrator)
