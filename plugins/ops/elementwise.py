"""Add, Mul and Concat: every input through DQ, a Q on the output (QLinearAdd/Mul/Concat on the CPU).

They are quantized only when at least one input already carries Q/DQ: inside an integer chain (residual
additions) they pay off; fed only by float ops (an attention mask being added) they would only add error.
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
        return NodePlan(inputs={0: Activation(), 1: Activation()}, outputs={0: Activation()})


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
