"""Pooling: MaxPool selects values (same scale as its input); averages get their own output scale."""

from __future__ import annotations

import onnx

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, SameAs
from ortq.pipeline.rewrite_qoperator import qlinear_unary, run_on_quantized


class MaxPoolQuantizer(OpQuantizer):
    op_types = ("MaxPool", "GlobalMaxPool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(inputs={}, outputs={0: SameAs(0)})  # output 1 (indices) is int64, stays as is

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """Max of integers is the integer of the max when the scale is shared: MaxPool runs on 8-bit data."""
        if len(node.output) > 1 and node.output[1]:
            return LeaveFloat("its indices output is used")
        return run_on_quantized(node, q, eight_bit_only=True)


class AveragePoolQuantizer(OpQuantizer):
    op_types = ("AveragePool", "GlobalAveragePool")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return self.extend_chain(node, ctx)

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QLinearAveragePool / QLinearGlobalAveragePool (NCHW: channels_last=0)."""
        if node.op_type == "GlobalAveragePool":
            return qlinear_unary(node, q, "QLinearGlobalAveragePool", channels_last=0)
        if q.attribute(node, "dilations") is not None and any(d != 1 for d in q.attribute(node, "dilations")):
            return LeaveFloat("QLinearAveragePool has no dilations")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name != "dilations"}
        return qlinear_unary(node, q, "QLinearAveragePool", **attrs)


@hookimpl
def ortq_register_op_quantizers(register):
    register(MaxPoolQuantizer)
    register(AveragePoolQuantizer)
