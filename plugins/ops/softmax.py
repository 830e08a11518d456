"""Softmax: its output lies in [0, 1] by definition, so the output range needs no calibration."""

from __future__ import annotations

import onnx

from ortq import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, hookimpl


class SoftmaxQuantizer(OpQuantizer):
    op_types = ("Softmax",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(inputs={0: Activation()}, outputs={0: Activation(fixed_range=(0.0, 1.0))})


@hookimpl
def ortq_register_op_quantizers(register):
    register(SoftmaxQuantizer)
