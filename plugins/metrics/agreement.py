"""``top1`` / ``top5``: how often the candidate model picks a class the reference model ranks highly.

Definition: a sample agrees at k when the candidate's top-1 class (its argmax) is among the reference's
k best classes. Ranks are stable (equal scores are ordered by class index, as argmax does), so ``top1``
is exactly "the two argmaxes are equal" and a model compared with itself agrees on every sample. The
last axis of the output holds the classes; every other axis counts as samples (per-token agreement for a
sequence model).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from ortq.core.hookspecs import hookimpl
from ortq.core.errors import ConfigError
from ortq.core.metric import MeanMetric, class_scores, stable_rank

log = logging.getLogger(__name__)


class TopKAgreement(MeanMetric):
    """Fraction of samples whose candidate top-1 class is in the reference's top ``k``."""

    k: ClassVar[int] = 1
    unit = "%"

    def values(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        output = self.scored_output
        ref = class_scores(reference, self.name, output)
        cand = class_scores(candidate, self.name, output)
        if ref.shape != cand.shape:
            raise ConfigError(f"metric {self.name!r}: output {output!r} has shape {reference.shape} in the reference "
                              f"model and {candidate.shape} in the candidate")
        if ref.shape[1] <= self.k and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("metric %r: output %r has only %d classes, so every sample agrees trivially",
                        self.name, output, ref.shape[1])
        return stable_rank(ref, cand.argmax(axis=1)) < self.k


class Top1Agreement(TopKAgreement):
    name = "top1"
    description = "candidate's top-1 class equals the reference's top-1 class (fraction of samples)"
    k = 1


class Top5Agreement(TopKAgreement):
    name = "top5"
    description = "candidate's top-1 class is among the reference's 5 best classes (fraction of samples)"
    k = 5


@hookimpl
def ortq_register_metrics(register) -> None:  # noqa: ANN001 - see ortq.core.hookspecs
    register(Top1Agreement)
    register(Top5Agreement)
