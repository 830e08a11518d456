"""Wiring of the per-layer weight corrections (weight rounding, bias correction) into one quantization.

Both need statistics of each layer's input that the range observers do not keep (per-channel means,
second moments). :func:`layer_statistics` says which tensors need them and gives the update functions the
calibration pass calls beside the range statistics (one pass over the data, flat memory);
:func:`apply_corrections` edits the pipeline's private float model once the scales are final: weights
first (their rounding is what bias correction compensates), then biases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from ortq.pipeline import bias_correction, weight_rounding

if TYPE_CHECKING:
    from ortq.core.config import QuantConfig
    from ortq.core.graph import GraphIndex
    from ortq.core.plan import QuantPlan
    from ortq.core.scheme import QuantParams

__all__ = ["LayerStatistics", "layer_statistics", "apply_corrections"]

log = logging.getLogger(__name__)


@dataclass
class LayerStatistics:
    bias_layers: list[bias_correction.LayerBias] = field(default_factory=list)
    means: bias_correction.ChannelMeans | None = None
    rounding_layers: list[weight_rounding.RoundingLayer] = field(default_factory=list)
    moments: weight_rounding.SecondMoments | None = None

    def updates(self) -> dict[str, Callable[[np.ndarray], None]]:
        """Per observed tensor, one function feeding every statistic that tensor takes part in."""
        parts: dict[str, list[Callable[[np.ndarray], None]]] = {}
        if self.means is not None:
            for name in self.means.axes:
                parts.setdefault(name, []).append(self.means.updater(name))
        if self.moments is not None:
            for name, update in self.moments.updates().items():
                parts.setdefault(name, []).append(update)

        def chain(functions: list[Callable[[np.ndarray], None]]) -> Callable[[np.ndarray], None]:
            if len(functions) == 1:
                return functions[0]

            def update(values: np.ndarray) -> None:
                for f in functions:
                    f(values)

            return update

        return {name: chain(fs) for name, fs in parts.items()}


def layer_statistics(config: QuantConfig, index: GraphIndex, plan: QuantPlan, observed: list[str]) -> LayerStatistics:
    """The statistics that ``config``'s corrections need, restricted to tensors the calibration observes."""
    stats = LayerStatistics()
    seen = set(observed)
    if config.bias_correction:
        stats.bias_layers = [l for l in bias_correction.find_layers(index, plan) if l.input in seen]
        axes: dict[str, int] = {}
        for layer in stats.bias_layers:
            axes.setdefault(layer.input, layer.axis)
        # a tensor read along two different axes (rare: a Gemm with transA beside a MatMul) keeps the first
        stats.bias_layers = [l for l in stats.bias_layers if axes[l.input] == l.axis]
        stats.means = bias_correction.ChannelMeans(axes)
    if config.weight_rounding:
        stats.rounding_layers = [l for l in weight_rounding.find_layers(index, plan) if l.input in seen]
        stats.moments = weight_rounding.SecondMoments(stats.rounding_layers)
    return stats


def apply_corrections(
    stats: LayerStatistics | None, config: QuantConfig, index: GraphIndex, plan: QuantPlan,
    params: dict[str, QuantParams], label: str,
) -> None:
    """Round weights (GPTQ) and correct biases in the private float model, with the final parameters."""
    if stats is None or (stats.means is None and stats.moments is None):
        if config.bias_correction or config.weight_rounding:
            log.info("%s: bias correction and weight rounding need calibration data (a saved state has no "
                     "layer statistics); skipped", label)
        return
    quantized = set(plan.quantized_nodes)
    originals: dict[str, np.ndarray] = {}
    if stats.moments is not None:
        layers = [l for l in stats.rounding_layers if l.node in quantized]
        originals = weight_rounding.round_weights(index, layers, params, stats.moments, bias_correction.set_constant)
    if stats.means is not None:
        layers = [l for l in stats.bias_layers if l.node in quantized]
        bias_correction.correct_biases(index, layers, params, stats.means, originals)
