"""What a metric plugin writes: a streaming score of a candidate model's outputs against a reference's.

``ortq evaluate`` feeds every metric one batch at a time, so a metric keeps running sums, never the
outputs themselves: memory stays constant however large the evaluation set is. The same class serves
the float baseline (candidate = the float model itself, so agreement metrics give 1.0 and label metrics
the float accuracy) and the quantized model, and the accuracy-driven quantization loop scores trial
models through exactly this interface.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from ortq.core.errors import ConfigError

__all__ = ["Metric", "MeanMetric", "class_scores", "stable_rank"]


class Metric:
    """Base class for metric plugins, registered by their lowercase ``name``.

    Options come from ``Toolkit.metric(name, **options)`` (API) or ``--metric name:key=value`` (CLI) as
    constructor keyword arguments. Every metric takes ``output``: the model output it scores (default the
    model's first output). Subclasses that take more options declare them as keyword arguments and pass
    ``output`` on to ``super().__init__``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Whether a larger result is better; decides the sign of the float-to-quantized "drop".
    higher_is_better: ClassVar[bool] = True
    #: The metric compares against ground-truth labels, so evaluation refuses to run without them.
    needs_labels: ClassVar[bool] = False
    #: How the CLI shows a result: "%" (a fraction shown as a percentage), "dB", or "" (a plain number).
    unit: ClassVar[str] = ""

    def __init__(self, output: str | None = None, **options: Any) -> None:
        if options:
            raise ConfigError(f"metric {self.name!r}: unknown option(s) {sorted(options)}")
        self.output = output
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far (called by ``__init__`` and before reusing the metric)."""
        raise NotImplementedError

    def update(
        self,
        reference: dict[str, np.ndarray],
        candidate: dict[str, np.ndarray],
        labels: np.ndarray | None = None,
    ) -> None:
        """Fold one batch in: both models' outputs by name (samples along axis 0), and the batch's labels."""
        raise NotImplementedError

    def result(self) -> float:
        """The score over every batch seen since the last reset."""
        raise NotImplementedError

    def merge(self, other: "Metric") -> None:
        """Fold in what ``other`` (same class and options) saw, as if this metric had seen those batches too.

        Lets an evaluation split over workers (``ortq evaluate --ray``) combine its shards. Running sums
        merge by adding them; a metric that cannot be combined keeps this default and is refused there.
        """
        raise ConfigError(f"metric {self.name!r} cannot combine results from several workers (it defines no merge())")

    # -- helpers for subclasses ---------------------------------------------------------------------
    def select(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The output this metric scores: ``output=`` if given, else the first one (the model's order)."""
        if not outputs:
            raise ConfigError(f"metric {self.name!r}: the model produced no outputs")
        if self.output is None:
            return np.asarray(next(iter(outputs.values())))
        if self.output not in outputs:
            raise ConfigError(
                f"metric {self.name!r}: the model has no output {self.output!r}; its outputs are {sorted(outputs)}"
            )
        return np.asarray(outputs[self.output])

    def output_name(self, outputs: Mapping[str, np.ndarray]) -> str:
        return self.output if self.output is not None else next(iter(outputs), "?")


class MeanMetric(Metric):
    """A mean of per-sample (or per-element) values: subclasses write ``values()``, the sums are kept here.

    Kept as a float64 sum and a count, so the result over many batches equals the result over their
    concatenation up to rounding, and memory does not grow with the number of batches.
    """

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(
        self,
        reference: dict[str, np.ndarray],
        candidate: dict[str, np.ndarray],
        labels: np.ndarray | None = None,
    ) -> None:
        if self.needs_labels and labels is None:
            raise ConfigError(f"metric {self.name!r} compares with labels; none were given")
        self.scored_output = self.output_name(reference)  # for error messages in values()
        values = np.asarray(self.values(self.select(reference), self.select(candidate), labels), np.float64)
        self.total += float(values.sum())
        self.count += int(values.size)

    def values(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """The batch's values to average (one per sample, or one per element)."""
        raise NotImplementedError

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def merge(self, other: "Metric") -> None:
        self.total += other.total
        self.count += other.count


def class_scores(array: np.ndarray, metric: str, output: str) -> np.ndarray:
    """``array`` as rows of class scores: the last axis holds the classes, every other axis is a sample.

    Raises :class:`ConfigError` naming the metric and output when there is no class axis to rank.
    """
    array = np.asarray(array)
    if array.ndim < 2 or array.shape[-1] < 2:
        raise ConfigError(
            f"metric {metric!r}: output {output!r} has shape {array.shape}, which has no class axis "
            "(the last axis must hold at least 2 class scores)"
        )
    return array.reshape(-1, array.shape[-1])


def stable_rank(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of class ``index[i]`` in row ``scores[i]``, sorting by descending score.

    Ties are broken by the lower class index first, as ``argmax`` does, so rank 0 is exactly the
    argmax and "rank < k" is "in the top k" without any arbitrary choice among equal scores.
    """
    rows = np.arange(scores.shape[0])
    own = scores[rows, index][:, None]
    ahead = (scores > own) | ((scores == own) & (np.arange(scores.shape[1])[None, :] < index[:, None]))
    return ahead.sum(axis=1)
