"""Activation functions after an integer kernel.

Relu and Clip(0, x) fold into the producer's output quantizer (their own Q clamps exactly when its zero
point is the type minimum, which asymmetric activations give a [0, x] range), so Conv+Relu becomes one
QLinearConv. With symmetric activations the zero point sits mid-range and the clamp would be lost. LeakyRelu, Sigmoid and HardSigmoid
get their own Q (QLinearLeakyRelu, QLinearSigmoid on the CPU).
"""

from __future__ import annotations

import onnx

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext
from ortq.pipeline.rewrite_qoperator import qlinear_unary

class _QuantizedChainOp(OpQuantizer):
    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        named = ctx.config.op_types is not None and node.op_type in ctx.config.op_types
        if named and not ctx.is_quantized(node.input[0]) and not ctx.is_constant(node.input[0]):
            # Asked for by name (ONNX Runtime quantizes a named op whatever feeds it): the input gets its
            # own Q/DQ, e.g. a Sigmoid reading a graph input then runs as QLinearSigmoid.
            return NodePlan(inputs={0: Activation()}, outputs={0: Activation()})
        return self.extend_chain(node, ctx)


class ReluQuantizer(_QuantizedChainOp):
    op_types = ("Relu",)

    def fused_input(self, node: onnx.NodeProto, ctx: PlanContext) -> int | None:
        return None if ctx.config.activation.symmetric else 0


class ClipQuantizer(_QuantizedChainOp):
    op_types = ("Clip",)

    def fused_input(self, node: onnx.NodeProto, ctx: PlanContext) -> int | None:
        """Only a clamp at exactly zero is what a zero point at the type minimum performs (QOperator folds it
        into the Q). In the QDQ format any constant clamp qualifies: the Clip stays in the graph, so its input
        needs no Q/DQ of its own, and quantizing only after the clamp (at the clamp's narrower range, as ONNX
        Runtime does) avoids a second rounding at the producer's wider range (Conv + Clip(-1, 1): +1.9 dB)."""
        if ctx.config.quant_format == "qdq" and self._constant_bounds(node, ctx):
            return 0
        if ctx.config.activation.symmetric:
            return None
        if len(node.input) > 1 and node.input[1]:
            low = ctx.index.constant_value(node.input[1])
            at_zero = low is not None and low.size == 1 and float(low.reshape(-1)[0]) == 0.0
        else:
            at_zero = float(ctx.attribute(node, "min", float("-inf"))) == 0.0
        return 0 if at_zero else None

    @staticmethod
    def _constant_bounds(node: onnx.NodeProto, ctx: PlanContext) -> bool:
        """Both clamp bounds are known constants (attributes before opset 11, constant inputs after)."""
        for i, attr in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                value = ctx.index.constant_value(node.input[i])
                if value is None or value.size != 1:
                    return False
            elif ctx.attribute(node, attr, None) is None and len(node.input) <= i:
                continue  # an absent bound is no clamp on that side
        return True


class PointwiseActivationQuantizer(_QuantizedChainOp):
    op_types = ("LeakyRelu", "Sigmoid", "HardSigmoid")

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """QLinearSigmoid and QLinearLeakyRelu (com.microsoft); ONNX Runtime has no QLinearHardSigmoid.
        Relu and Clip need no kernel: the QOperator pass folds them into the Q before them."""
        if node.op_type == "Sigmoid":
            return qlinear_unary(node, q, "QLinearSigmoid")
        if node.op_type == "LeakyRelu":
            return qlinear_unary(node, q, "QLinearLeakyRelu", alpha=float(q.attribute(node, "alpha", 0.01)))
        return LeaveFloat(f"ONNX Runtime has no QLinear{node.op_type} kernel")


@hookimpl
def ortq_register_op_quantizers(register):
    register(ReluQuantizer)
    register(ClipQuantizer)
    register(PointwiseActivationQuantizer)
