"""What an op quantizer plugin writes: a declaration of how one node's tensors are quantized.

Op quantizers do not edit the graph. They say, per input and output, which role the tensor plays
(activation, weight, bias, or "same parameters as input i"); the planner applies the graph-wide rules
(one quantizer per tensor, ReLU folding, vetoes) and the rewriter emits Q/DQ. Keeping the plugin side
declarative is what lets one plan serve the QDQ rewriter, calibration and every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Union

import onnx

if TYPE_CHECKING:
    from .config import QuantConfig
    from .graph import GraphIndex

__all__ = [
    "OpQuantizer",
    "PlanContext",
    "NodePlan",
    "LeaveFloat",
    "Activation",
    "Weight",
    "Bias",
    "SameAs",
    "Role",
]


@dataclass(frozen=True)
class Activation:
    """A float tensor quantized with the activation scheme.

    The range comes from calibration, or from ``fixed_range`` when the op's math bounds it (Softmax, Sigmoid).
    Constant inputs given this role (the constant side of an Add, say) take their range from their values.
    """

    fixed_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Weight:
    """A constant quantized with the weight scheme; ``axis`` is the output-channel axis for per-channel."""

    axis: int | None = None


@dataclass(frozen=True)
class Bias:
    """A constant bias quantized to int32 with scale = scale(input ``input``) * scale(input ``weight``)."""

    input: int = 0
    weight: int = 1


@dataclass(frozen=True)
class SameAs:
    """An output that must carry exactly input ``input``'s scale and zero point (ops that only move data)."""

    input: int = 0


Role = Union[Activation, Weight, Bias, SameAs]


@dataclass
class NodePlan:
    """Roles by input and output index; indices left out stay float."""

    inputs: dict[int, Role] = field(default_factory=dict)
    outputs: dict[int, Role] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaveFloat:
    """Returned instead of a plan: this node stays float, and ``reason`` says why (shown by ``ortq info``)."""

    reason: str


class PlanContext:
    """What an op quantizer may ask while planning one node."""

    def __init__(self, index: GraphIndex, config: QuantConfig, quantized: set[str]) -> None:
        self.index = index
        self.config = config
        self._quantized = quantized

    def is_quantized(self, tensor: str) -> bool:
        """True if an earlier node (in topological order) already gave ``tensor`` a quantized activation."""
        return tensor in self._quantized

    def is_constant(self, tensor: str) -> bool:
        return self.index.is_constant(tensor)

    def is_float(self, tensor: str) -> bool:
        return self.index.is_float(tensor)

    def attribute(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        return self.index.attribute(node, name, default)

    def string_attribute(self, node: onnx.NodeProto, name: str, default: str) -> str:
        value = self.index.attribute(node, name, default)
        return value.decode() if isinstance(value, bytes) else str(value)

    def weight_axis(self, axis: int) -> int | None:
        """``axis`` if per-channel weights are on, else None (per-tensor)."""
        return axis if self.config.per_channel else None


class OpQuantizer:
    """Base class for op quantizer plugins; one subclass per op family, registered by its ``op_types``.

    Subclasses implement :meth:`plan`, and :meth:`fused_input` where ONNX Runtime fuses the node into the
    integer kernel that produces one of its inputs (ReLU's clamp, a MatMul's bias Add): that input then
    gets no Q/DQ of its own. ``float_output_ok`` marks ops whose
    integer kernel can write a float output (MatMul -> MatMulIntegerToFloat): when every consumer of
    their output stays float, the output's Q/DQ is dropped instead of adding error for nothing.
    """

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    float_output_ok: ClassVar[bool] = False

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        raise NotImplementedError

    def fused_input(self, node: onnx.NodeProto, ctx: PlanContext) -> int | None:
        """Index of the input whose producing integer kernel absorbs this node, or None.

        The planner drops that input's Q/DQ only if the producer is quantized, the input has no other
        reader, and this node's output is quantized, so the fused kernel ends in this node's Q.
        """
        return None

    # Helpers shared by many op families -------------------------------------------------------------
    @staticmethod
    def extend_chain(node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        """Input 0 and output 0 as activations, if input 0 already carries Q/DQ (else nothing to extend)."""
        if not ctx.is_quantized(node.input[0]):
            return LeaveFloat("its input is not quantized, so there is no integer kernel to extend")
        return NodePlan(inputs={0: Activation()}, outputs={0: Activation()})

    @staticmethod
    def activation_inputs_quantized(node: onnx.NodeProto, ctx: PlanContext, indices: list[int]) -> bool:
        """True if at least one non-constant input among ``indices`` already carries Q/DQ upstream.

        Element-wise ops pay off only inside an integer chain; one fed only by float ops would add a
        Q/DQ pair without an integer kernel to run, and would quantize things like attention masks.
        """
        return any(
            i < len(node.input) and node.input[i] and not ctx.is_constant(node.input[i])
            and ctx.is_quantized(node.input[i])
            for i in indices
        )
