"""Conv and ConvTranspose: activation in, per-output-channel weights, int32 bias, activation out.

ONNX Runtime's CPU provider fuses DQ -> Conv -> Q with int8 weights and an int32 bias whose scale is
input scale x weight scale into QLinearConv; uint8 weights would select a kernel 4x slower.
"""

from __future__ import annotations

import onnx

from ortq import Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, Weight, hookimpl


class ConvQuantizer(OpQuantizer):
    op_types = ("Conv",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(
            inputs={0: Activation(), 1: Weight(axis=ctx.weight_axis(0)), 2: Bias(input=0, weight=1)},
            outputs={0: Activation()},
        )


class ConvTransposeQuantizer(OpQuantizer):
    """ConvTranspose weights are [C_in, C_out / group, kH, kW]: output channels lie on axis 1."""

    op_types = ("ConvTranspose",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        group = int(ctx.attribute(node, "group", 1))
        # With groups, axis 1 holds only C_out / group channels; the bias (length C_out) would not line up.
        axis = ctx.weight_axis(1) if group == 1 else None
        inputs = {0: Activation(), 1: Weight(axis=axis)}
        if group == 1 or not ctx.config.per_channel:
            inputs[2] = Bias(input=0, weight=1)
        return NodePlan(inputs=inputs, outputs={0: Activation()})


@hookimpl
def ortq_register_op_quantizers(register):
    register(ConvQuantizer)
    register(ConvTransposeQuantizer)
