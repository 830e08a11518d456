"""Pooling: MaxPool selects values (same scale as its input); averages get their own output scale."""

from __future__ import annotations

import onnx

from ortq import LeaveFloat, NodePlan, OpQuantizer, PlanContext, SameAs, hookimpl


class MaxPoolQuantizer(OpQuantizer):
    op_types = ("MaxPool", "GlobalMaxPool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(inputs={}, outputs={0: SameAs(0)})  # output 1 (indices) is int64, stays as is


class AveragePoolQuantizer(OpQuantizer):
    op_types = ("AveragePool", "GlobalAveragePool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return self.extend_chain(node, ctx)


@hookimpl
def ortq_register_op_quantizers(register):
    register(MaxPoolQuantizer)
    register(AveragePoolQuantizer)
