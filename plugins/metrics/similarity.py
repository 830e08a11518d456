"""``cosine``, ``mse``, ``sqnr``: how close the candidate's raw outputs stay to the reference's.

These need no class axis, so they also serve regression, detection and embedding models. Every output
is compared as float64. ``sqnr`` is over all elements of all batches (the same number as
:func:`ortq.core.error_measures.sqnr_db` on the concatenated outputs), kept as two running sums.
"""

from __future__ import annotations

import numpy as np

from ortq.core.hookspecs import hookimpl
from ortq.core.metric import Metric
from ortq.core.errors import ConfigError
from ortq.core.metric import MeanMetric
from ortq.core.error_measures import sqnr_from_sums


def _pair(metric: Metric, output: str, reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != cand.shape:
        raise ConfigError(
            f"metric {metric.name!r}: output {output!r} has shape {ref.shape} in the "
            f"reference model and {cand.shape} in the candidate"
        )
    return ref, cand


class CosineSimilarity(MeanMetric):
    """Mean over samples of the cosine similarity of each sample's flattened outputs.

    Per sample rather than over the whole set, so one badly broken sample is not averaged away by the
    norm of the others. Two all-zero samples count as identical (1.0); zero against non-zero as 0.0.
    """

    name = "cosine"
    description = "mean per-sample cosine similarity of the outputs"

    def values(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        ref, cand = _pair(self, self.scored_output, reference, candidate)
        if ref.size == 0:
            return np.empty(0)
        rows = ref.shape[0] if ref.ndim else 1
        ref, cand = ref.reshape(rows, -1), cand.reshape(rows, -1)
        dot = np.einsum("ij,ij->i", ref, cand)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        equal = np.all(ref == cand, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), equal.astype(np.float64))


class MeanSquaredError(MeanMetric):
    """Mean over all elements of the squared difference."""

    name = "mse"
    description = "mean squared error over all output elements"
    higher_is_better = False

    def values(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        ref, cand = _pair(self, self.scored_output, reference, candidate)
        return (ref - cand) ** 2


class Sqnr(Metric):
    """Signal-to-quantization-noise ratio in dB over all elements: 10 log10(sum ref^2 / sum (ref - cand)^2).

    +inf when the outputs are identical (the float baseline), -inf when the reference is all zeros.
    """

    name = "sqnr"
    description = "signal-to-quantization-noise ratio in dB over all output elements"
    unit = "dB"

    def reset(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.count = 0

    def update(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
               labels: np.ndarray | None = None) -> None:
        ref, cand = _pair(self, self.output_name(reference), self.select(reference), self.select(candidate))
        self.signal += float(np.sum(ref**2))
        self.noise += float(np.sum((ref - cand) ** 2))
        self.count += int(ref.size)

    def result(self) -> float:
        return sqnr_from_sums(self.signal, self.noise) if self.count else float("nan")

    def merge(self, other: Metric) -> None:
        self.signal += other.signal
        self.noise += other.noise
        self.count += other.count


@hookimpl
def ortq_register_metrics(register) -> None:  # noqa: ANN001 - see ortq.core.hookspecs
    register(CosineSimilarity)
    register(MeanSquaredError)
    register(Sqnr)
