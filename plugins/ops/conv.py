"""Conv and ConvTranspose: activation in, per-output-channel weights, int32 bias, activation out.

ONNX Runtime's CPU provider fuses DQ -> Conv -> Q with int8 weights and an int32 bias whose scale is
input scale x weight scale into QLinearConv; uint8 weights would select a kernel 4x slower.
"""

from __future__ import annotations

import onnx

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, Weight
from ortq.pipeline.rewrite_qoperator import check_kernel_types, int32_bias


class ConvQuantizer(OpQuantizer):
    op_types = ("Conv",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(
            inputs={0: Activation(), 1: Weight(axis=ctx.weight_axis(0)), 2: Bias(input=0, weight=1)},
            outputs={0: Activation()},
        )

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B) with Conv's attributes."""
        x, w, y = q.input(0), q.input(1), q.output(0)
        if x is None or w is None or y is None:
            return LeaveFloat("its input, weight and output are not all quantized")
        if w.axis not in (None, 0):
            return LeaveFloat(f"weight {w.name!r} is quantized along axis {w.axis}, QLinearConv takes axis 0")
        bad = check_kernel_types([x, y], w)
        if bad is not None:
            return bad
        inputs = [x.name, x.scale, x.zero_point, w.name, w.scale, w.zero_point, y.scale, y.zero_point]
        if len(node.input) > 2 and node.input[2]:
            bias = int32_bias(node, q, 2, x, w)
            if isinstance(bias, LeaveFloat):
                return bias
            inputs.append(bias)
        kernel = onnx.helper.make_node("QLinearConv", inputs, [y.name], name=q.fresh_name(f"{node.name}_quant"))
        kernel.attribute.extend(node.attribute)
        return [kernel]


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


class InstanceNormalizationQuantizer(OpQuantizer):
    """InstanceNormalization quantized as ONNX Runtime does: input and output as activations, the scale
    (gamma) as a weight (per channel along axis 0), B as an int32 bias at input scale x gamma scale.

    No ONNX Runtime kernel runs it on integers (DQ -> float InstanceNormalization -> Q), so it saves nothing and
    adds a rounding of gamma: ortq quantizes it only when named in ``op_types_to_quantize`` or in the ONNX
    Runtime drop-in's default list (``QuantConfig.default_named_op_types``), whatever feeds it.
    """

    op_types = ("InstanceNormalization",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        named = ctx.config.op_types is not None and node.op_type in ctx.config.op_types
        if not named and node.op_type not in ctx.config.default_named_op_types:
            return LeaveFloat("no integer InstanceNormalization kernel: quantized only when op_types_to_quantize "
                              "names it")
        return NodePlan(
            inputs={0: Activation(), 1: Weight(axis=ctx.weight_axis(0)), 2: Bias(input=0, weight=1)},
            outputs={0: Activation()},
        )


@hookimpl
def ortq_register_op_quantizers(register):
    register(ConvQuantizer)
    register(ConvTransposeQuantizer)
    register(InstanceNormalizationQuantizer)
