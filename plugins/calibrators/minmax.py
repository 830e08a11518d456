"""The ``minmax`` calibrator: the observed extremes, optionally as a moving average over batches."""

from __future__ import annotations

from ortq import Calibrator, MinMaxStatistic, QuantSpec, Statistic, hookimpl


class MinMaxCalibrator(Calibrator):
    """Exact over all samples, which makes it sensitive to outliers; ``moving_average`` damps single batches.

    ``symmetric`` widens the range to [-max|x|, max|x|] (ONNX Runtime's CalibTensorRangeSymmetric).
    """

    name = "minmax"
    description = "observed minimum and maximum (optionally a moving average of per-batch extremes)"

    def __init__(self, moving_average: bool = False, averaging_constant: float = 0.01, symmetric: bool = False) -> None:
        if not 0.0 < float(averaging_constant) <= 1.0:
            raise ValueError("averaging_constant must be in (0, 1]")
        self.averaging_constant = float(averaging_constant) if _truthy(moving_average) else None
        self.symmetric = _truthy(symmetric)

    def create_statistic(self, tensor: str) -> Statistic:
        return MinMaxStatistic(self.averaging_constant)

    def compute_range(self, tensor: str, statistic: Statistic, spec: QuantSpec) -> tuple[float, float]:
        assert isinstance(statistic, MinMaxStatistic)
        if statistic.min is None or statistic.max is None:
            return 0.0, 0.0  # never saw a value (zero-size tensors): any scale represents it exactly
        lo, hi = statistic.min, statistic.max
        if self.symmetric:
            bound = max(abs(lo), abs(hi))
            return -bound, bound
        return lo, hi


def _truthy(value: object) -> bool:
    """Options may arrive from the CLI as strings."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


@hookimpl
def ortq_register_calibrators(register):
    register(MinMaxCalibrator)
