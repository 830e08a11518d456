"""What a calibrator plugin writes: a statistic that observers feed, and a reduction of it to a range.

Statistics are separated from calibrators so one observed run can serve any calibrator that needs the
same statistic, and so statistics can be merged across shards and saved without code (``to_dict``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import numpy as np

from ortq.core.scheme import QuantSpec

__all__ = ["Statistic", "Calibrator", "MinMaxStatistic"]


class Statistic:
    """Running state for one observed tensor. ``update`` is called once per batch, under a lock."""

    kind: ClassVar[str] = ""

    def update(self, values: np.ndarray) -> None:
        raise NotImplementedError

    def merge(self, other: "Statistic") -> None:
        """Fold another shard's statistic of the same tensor into this one."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible state; loading it must never execute code."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Statistic":
        raise NotImplementedError


class MinMaxStatistic(Statistic):
    """Running minimum and maximum, optionally as an exponential moving average of per-batch extremes.

    NaN propagates into the extremes on purpose: :meth:`nonfinite` then reports the tensor by name
    instead of the range silently skipping bad values.
    """

    kind = "minmax"

    def __init__(self, averaging_constant: float | None = None) -> None:
        self.averaging_constant = averaging_constant
        self.min: float | None = None
        self.max: float | None = None
        self.batches = 0
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        lo, hi = float(np.min(values)), float(np.max(values))
        if np.isnan(lo) or np.isnan(hi):
            lo = hi = float("nan")
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
        elif self.averaging_constant is not None:
            c = self.averaging_constant
            self.min = self.min + c * (lo - self.min)
            self.max = self.max + c * (hi - self.max)
        else:
            self.min, self.max = _nanmin(self.min, lo), _nanmax(self.max, hi)
        self.batches += 1
        self.count += int(values.size)

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, MinMaxStatistic)
        if other.min is None:
            return
        if self.min is None or self.max is None:
            self.min, self.max = other.min, other.max
        else:
            self.min, self.max = _nanmin(self.min, other.min), _nanmax(self.max, other.max)
        self.batches += other.batches
        self.count += other.count

    def nonfinite(self) -> bool:
        return self.min is not None and not (np.isfinite(self.min) and np.isfinite(self.max))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "min": self.min, "max": self.max, "batches": self.batches, "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MinMaxStatistic":
        stat = cls()
        stat.min, stat.max = data["min"], data["max"]
        stat.batches, stat.count = int(data["batches"]), int(data["count"])
        return stat


def _nanmin(a: float, b: float) -> float:
    return float("nan") if np.isnan(a) or np.isnan(b) else min(a, b)


def _nanmax(a: float, b: float) -> float:
    return float("nan") if np.isnan(a) or np.isnan(b) else max(a, b)


class Calibrator:
    """Base class for calibrator plugins, registered by their lowercase ``name``.

    A calibrator makes one :class:`Statistic` per observed tensor and reduces it to the real range that
    the tensor's quantization parameters must cover. Options come from ``calibrator_options`` (API) or
    ``--calibrator-option key=value`` (CLI) as constructor keyword arguments.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Statistic classes this calibrator can reduce; saved calibration states are loaded through these.
    statistic_types: ClassVar[tuple[type[Statistic], ...]] = ()

    #: Tensors whose largest values carry the result (graph outputs such as logits, the inputs of Softmax,
    #: ArgMax, TopK, ReduceMax, through any data movement in between), set by the pipeline with
    #: :meth:`set_tail_sensitive` before ranges are computed. A calibrator that clips should keep their maximum:
    #: clipping the top logits changes which class wins, whatever it saves in squared error.
    tail_sensitive: frozenset[str] = frozenset()

    def set_tail_sensitive(self, tensors: Iterable[str]) -> None:
        self.tail_sensitive = frozenset(tensors)

    def create_statistic(self, tensor: str) -> Statistic:
        raise NotImplementedError

    def compute_range(self, tensor: str, statistic: Statistic, spec: QuantSpec) -> tuple[float, float]:
        raise NotImplementedError
