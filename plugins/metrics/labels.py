"""``accuracy`` / ``top5_accuracy``: the candidate model against ground-truth class labels.

A sample is correct at k when its label is among the candidate's k best classes, ranked stably (equal
scores ordered by class index), so ``accuracy`` is exactly ``argmax == label`` and a model whose output
collapsed to a constant is not credited with ties. Labels hold one class index per sample (per row of
the output when it has more than two axes).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ortq.core.hookspecs import hookimpl
from ortq.core.errors import ConfigError
from ortq.core.metric import MeanMetric, class_scores, stable_rank


class TopKAccuracy(MeanMetric):
    """Fraction of samples whose label is in the candidate's top ``k`` classes."""

    k: ClassVar[int] = 1
    needs_labels = True
    unit = "%"

    def values(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        output = self.scored_output
        scores = class_scores(candidate, self.name, output)
        assert labels is not None  # MeanMetric.update refuses a label metric without labels
        index = _class_indices(np.asarray(labels), scores.shape[1], self.name)
        if index.size != scores.shape[0]:
            raise ConfigError(
                f"metric {self.name!r}: {index.size} label(s) for {scores.shape[0]} sample(s) of output {output!r} "
                f"(shape {candidate.shape})"
            )
        return stable_rank(scores, index) < self.k


def _class_indices(labels: np.ndarray, classes: int, metric: str) -> np.ndarray:
    """Labels as int64 class indices; non-integral or out-of-range labels are an error, not a miss."""
    flat = labels.reshape(-1)
    if flat.dtype.kind == "f":
        if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
            raise ConfigError(f"metric {metric!r}: labels must be class indices; found non-integral values")
    elif flat.dtype.kind not in "iub":
        raise ConfigError(f"metric {metric!r}: labels must be class indices, not {flat.dtype}")
    index = flat.astype(np.int64)
    bad = (index < 0) | (index >= classes)
    if np.any(bad):
        raise ConfigError(
            f"metric {metric!r}: label {int(index[bad][0])} is outside the model's {classes} classes (0..{classes - 1})"
        )
    return index


class Accuracy(TopKAccuracy):
    name = "accuracy"
    description = "top-1 accuracy against the labels (fraction of samples)"
    k = 1


class Top5Accuracy(TopKAccuracy):
    name = "top5_accuracy"
    description = "label among the candidate's 5 best classes (fraction of samples)"
    k = 5


@hookimpl
def ortq_register_metrics(register) -> None:  # noqa: ANN001 - see ortq.core.hookspecs
    register(Accuracy)
    register(Top5Accuracy)
