"""What an op quantizer plugin writes: a declaration of how one node's tensors are quantized.

Op quantizers do not edit the graph. They say, per input and output, which role the tensor plays
(activation, weight, bias, or "same parameters as input i"); the planner applies the graph-wide rules
(one quantizer per tensor, ReLU folding, vetoes) and the rewriter emits Q/DQ. Keeping the plugin side
declarative is what lets one plan serve the QDQ rewriter, calibration and every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Union

import numpy as np
import onnx

if TYPE_CHECKING:
    from ortq.core.config import QuantConfig
    from ortq.core.graph import GraphIndex

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
    "QuantizedTensor",
    "QOperatorContext",
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


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as an integer (QOperator) kernel reads or writes it: the integer data and its parameters.

    ``name`` is the integer tensor (a DequantizeLinear's input, or a QuantizeLinear's output); ``scale`` and
    ``zero_point`` name the parameter tensors a kernel takes (the QOperator pass adds an explicit zero
    point where the Q/DQ had none, because several kernels require one), and ``scale_value`` /
    ``zero_point_value`` hold their values when they are constants (None when computed at run time).
    ``axis`` is the per-channel axis, ``elem_type`` the ONNX type of the integer data, ``constant`` True
    when the integer data itself is a constant (a weight or bias), ``shape`` its shape if known.
    """

    name: str
    scale: str
    zero_point: str
    scale_value: np.ndarray | None
    zero_point_value: np.ndarray | None
    elem_type: int
    axis: int | None = None
    constant: bool = False
    scale_elem_type: int = onnx.TensorProto.FLOAT
    #: The tensor's shape where the graph declares it (on the integer or the float side), else None.
    shape: list[int | str | None] | None = None

    @property
    def per_tensor(self) -> bool:
        """True for one scale and zero point (what every activation input of ONNX Runtime's kernels needs)."""
        return self.scale_value is not None and self.scale_value.size == 1 and (
            self.zero_point_value is None or self.zero_point_value.size == 1
        )

    @property
    def is_8bit(self) -> bool:
        return self.elem_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)

    def same_parameters(self, other: QuantizedTensor) -> bool:
        """Exactly the same scale and zero point (by name, or by constant value and type)."""
        if self.elem_type != other.elem_type:
            return False
        if self.scale == other.scale and self.zero_point == other.zero_point:
            return True
        values = (self.scale_value, other.scale_value, self.zero_point_value, other.zero_point_value)
        if any(v is None for v in values):
            return False
        return bool(
            self.scale_value.shape == other.scale_value.shape and np.array_equal(self.scale_value, other.scale_value)
            and np.array_equal(self.zero_point_value.astype(np.int64), other.zero_point_value.astype(np.int64))
        )


class QOperatorContext:
    """What an op quantizer may ask while turning one DQ -> node -> Q pattern into an integer kernel.

    ``inputs[i]`` is the quantized form of the node's input ``i`` (it is a DequantizeLinear output), or
    None (float, or absent). ``outputs[j]`` is the quantized form of output ``j`` (every reader of it is a
    QuantizeLinear), or None (the output stays float). The kernel must write each quantized output under
    ``outputs[j].name`` and each float output that has readers under its original name. It works on any
    QDQ model, not only on ortq's plans, so it never looks at a plan or config.
    """

    def __init__(
        self,
        node: onnx.NodeProto,
        index: GraphIndex,
        inputs: list[QuantizedTensor | None],
        outputs: list[QuantizedTensor | None],
        add_constant: Callable[[str, np.ndarray], str],
        fresh_name: Callable[[str], str],
        epilogues: dict[int, tuple[onnx.NodeProto, QuantizedTensor | None]] | None = None,
    ) -> None:
        self.node = node
        self.index = index
        self.inputs = inputs
        self.outputs = outputs
        self._add_constant = add_constant
        self._fresh_name = fresh_name
        self._epilogues = epilogues or {}
        #: Nodes after this one that the kernel computes too (their outputs then come from the kernel).
        self.absorbed: list[onnx.NodeProto] = []

    def input(self, i: int) -> QuantizedTensor | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def output(self, j: int = 0) -> QuantizedTensor | None:
        return self.outputs[j] if j < len(self.outputs) else None

    def constant_value(self, name: str) -> np.ndarray | None:
        return self.index.constant_value(name) if name else None

    def attribute(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        return self.index.attribute(node, name, default)

    def shape(self, name: str) -> list[int | str | None] | None:
        return self.index.shape(name)

    def opset(self, domain: str = "") -> int:
        return self.index.opset(domain)

    def add_constant(self, base: str, value: np.ndarray) -> str:
        """Add an initializer under a fresh name derived from ``base``; returns the name."""
        return self._add_constant(base, value)

    def fresh_name(self, base: str) -> str:
        return self._fresh_name(base)

    def epilogue(self, j: int = 0) -> tuple[onnx.NodeProto, QuantizedTensor | None] | None:
        """The only reader of float output ``j`` and the quantized form of its output (None: float), if
        output ``j`` is not quantized itself; a kernel that computes that reader too (a MatMul's bias Add)
        calls :meth:`absorb` and writes the reader's output instead."""
        return self._epilogues.get(j)

    def absorb(self, node: onnx.NodeProto) -> None:
        self.absorbed.append(node)


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

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat | None:
        """The node as integer kernel(s) reading and writing quantized tensors (the QOperator format).

        Called by :func:`ortq.pipeline.rewrite_qoperator.convert_to_qoperator` for a node some of whose inputs are
        DequantizeLinear outputs or whose outputs feed QuantizeLinear. Return the replacement nodes, or
        ``LeaveFloat(reason)`` when this node's types or attributes have no integer kernel, or None (the
        default: this op quantizer provides only the QDQ format). Either way the node then keeps its Q/DQ.
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
