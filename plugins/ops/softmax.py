"""Softmax: its output lies in [0, 1] by definition, so the output range needs no calibration."""

from __future__ import annotations

import onnx

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext
from ortq.pipeline.rewrite_qoperator import qlinear_unary


class SoftmaxQuantizer(OpQuantizer):
    op_types = ("Softmax",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(inputs={0: Activation()}, outputs={0: Activation(fixed_range=(0.0, 1.0))})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QLinearSoftmax; its ``opset`` attribute says which Softmax's axis semantics apply
        (before opset 13 the input is flattened at ``axis``, since 13 only that axis is reduced)."""
        opset = q.opset()
        return qlinear_unary(node, q, "QLinearSoftmax", axis=int(q.attribute(node, "axis", -1 if opset >= 13 else 1)), opset=opset)


@hookimpl
def ortq_register_op_quantizers(register):
    register(SoftmaxQuantizer)
