"""Add, Mul and Concat: every input through DQ, a Q on the output (QLinearAdd/Mul/Concat on the CPU).

They are quantized only when at least one input already carries Q/DQ: inside an integer chain (residual
additions) they pay off; fed only by float ops (an attention mask being added) they would only add error.

A bias Add after a MatMul with a constant weight (how transformer exporters write Linear layers) is
fused instead: the MatMul's output gets no Q/DQ and the bias stays a float constant. ONNX Runtime then
runs DQ -> MatMul -> Add -> Q as one QGemm (2-D input) or MatMulIntegerToFloat + Add (3-D, dynamic
batch). Measured at 128x768 @ 768x768 it is as fast as QLinearMatMul + QLinearAdd, and it skips one
requantization (+0.5 dB output SQNR on the test transformer block).
"""

from __future__ import annotations

import onnx

from ortq import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, hookimpl

_NOT_IN_CHAIN = "no input is quantized upstream, so an integer kernel here would only add Q/DQ"


class BinaryElementwiseQuantizer(OpQuantizer):
    op_types = ("Add", "Mul")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if not self.activation_inputs_quantized(node, ctx, [0, 1]):
            return LeaveFloat(_NOT_IN_CHAIN)
        matmul = self.fused_input(node, ctx)
        if matmul is not None:
            return NodePlan(inputs={matmul: Activation()}, outputs={0: Activation()})
        return NodePlan(inputs={0: Activation(), 1: Activation()}, outputs={0: Activation()})

    def fused_input(self, node: onnx.NodeProto, ctx: PlanContext) -> int | None:
        """The MatMul side of ``MatMul(x, W) + b`` with constant W and a constant bias vector b."""
        if node.op_type != "Add" or len(node.input) != 2:
            return None
        for i in (0, 1):
            producer = ctx.index.producer.get(node.input[i])
            bias = ctx.index.constant_value(node.input[1 - i])
            if (
                producer is not None and producer.op_type == "MatMul" and ctx.is_constant(producer.input[1])
                and len(ctx.index.consumers.get(node.input[i], [])) == 1
                and bias is not None and bias.ndim == 1
            ):
                return i
        return None


class ConcatQuantizer(OpQuantizer):
    op_types = ("Concat",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        indices = list(range(len(node.input)))
        if not self.activation_inputs_quantized(node, ctx, indices):
            return LeaveFloat(_NOT_IN_CHAIN)
        return NodePlan(inputs={i: Activation() for i in indices}, outputs={0: Activation()})


@hookimpl
def ortq_register_op_quantizers(register):
    register(BinaryElementwiseQuantizer)
    register(ConcatQuantizer)
