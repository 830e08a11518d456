"""Pooling: MaxPool selects values (same scale as its input); averages get their own output scale."""

from __future__ import annotations

import onnx

from ortq import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, SameAs, hookimpl


class MaxPoolQuantizer(OpQuantizer):
    op_types = ("MaxPool", "GlobalMaxPool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(inputs={}, outputs={0: SameAs(0)})  # output 1 (indices) is int64, stays as is


class AveragePoolQuantizer(OpQuantizer):
    op_types = ("AveragePool", "GlobalAveragePool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if not ctx.is_quantized(node.input[0]):
            return LeaveFloat("its input is not quantized, so there is no integer kernel to extend")
        return NodePlan(inputs={0: Activation()}, outputs={0: Activation()})


@hookimpl
def ortq_register_op_quantizers(register):
    register(MaxPoolQuantizer)
    register(AveragePoolQuantizer)
