"""What a backend plugin writes: a deployment target's scheme, its op policy, and its artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import onnx

from ortq.core.config import QuantConfig

if TYPE_CHECKING:
    from ortq.core.op_quantizer import PlanContext
    from ortq.core.plan import QuantPlan
    from ortq.core.report import QuantizationResult

__all__ = ["Backend"]


class Backend:
    """Base class for target backends, registered by their lowercase ``name`` (``--target NAME``).

    ``default_config`` is the scheme the target runs best; the user's explicit options override it.
    ``excluded_op_types`` are ops the target runs slower (or no faster) quantized; every other op with a
    registered op quantizer, third-party ones included, is quantized by default. A target that supports
    only a few ops sets ``default_op_types`` instead. ``prepare`` rewrites the float model before planning
    (folding BatchNormalization for a target that runs Conv only, say); ``leave_float`` vetoes single
    nodes (returning the reason); ``export`` writes whatever the target needs beside the model, and may
    raise :class:`ortq.ModelError` naming a node the target cannot run. Constructor keyword arguments are
    the backend's options (``backend_options=`` in Python, ``--backend-option key=value`` on the CLI).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_op_types: ClassVar[frozenset[str] | None] = None
    excluded_op_types: ClassVar[frozenset[str]] = frozenset()
    #: The artifact formats ``export`` can write, when there is a choice (ESP-DL: ``cpp`` for v1.1, ``espdl`` for
    #: v3). A backend that declares any takes them as its ``format`` option; ``ortq export NAME`` then offers
    #: ``--format`` with these choices (default: the backend's own). Empty: one output, no option.
    output_formats: ClassVar[tuple[str, ...]] = ()

    def default_config(self) -> QuantConfig:
        return QuantConfig(op_types=self.default_op_types, excluded_op_types=self.excluded_op_types)

    def check_config(self, config: QuantConfig) -> None:
        """Refuse (with :class:`ortq.ConfigError`) user options the target cannot run, before any work."""

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The float model as the target will run it; the pipeline's private copy, free to edit."""
        return model

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        return None

    def check_plan(self, plan: QuantPlan, model: onnx.ModelProto) -> None:
        """Refuse (with :class:`ortq.ModelError`) a plan the target cannot run, before calibration: an
        export that would refuse a float node should not make the user wait for the whole quantization
        first. ``model`` is the prepared float model. Default: anything goes."""

    def extra_observed_tensors(self, model: onnx.ModelProto) -> list[str]:
        """Tensors of the prepared float ``model`` whose calibrated range the target needs although the plan
        does not quantize them (TensorRT's implicit-INT8 tables want one for every float tensor). The
        pipeline observes them alongside the plan's activations and puts their ranges in
        ``QuantizationResult.ranges``; nothing else uses them. Default: none."""
        return []

    def export(self, result: QuantizationResult, out_dir: Path) -> list[Path]:
        return []
