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

from onnx import helper

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext
from ortq.pipeline.rewrite_qoperator import MS_DOMAIN, check_kernel_types

_NOT_IN_CHAIN = "no input is quantized upstream, so an integer kernel here would only add Q/DQ"


class BinaryElementwiseQuantizer(OpQuantizer):
    op_types = ("Add", "Mul")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        # Named in op_types_to_quantize, it is quantized whatever feeds it (as ONNX Runtime does): an Add of a
        # graph input and a constant then gets Q/DQ on both and on its output (QLinearAdd in QOperator).
        named = ctx.config.op_types is not None and node.op_type in ctx.config.op_types
        if not named and not self.activation_inputs_quantized(node, ctx, [0, 1]):
            return LeaveFloat(_NOT_IN_CHAIN)
        matmul = self.fused_input(node, ctx)
        if matmul is not None:
            return NodePlan(inputs={matmul: Activation()}, outputs={0: Activation()})
        return NodePlan(inputs={0: Activation(), 1: Activation()}, outputs={0: Activation()})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QLinearAdd / QLinearMul(A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp)."""
        a, b, y = q.input(0), q.input(1), q.output(0)
        if a is None or b is None or y is None:
            return LeaveFloat("its inputs and output are not all quantized")
        bad = check_kernel_types([a, b, y])
        if bad is not None:
            return bad
        return [helper.make_node(
            f"QLinear{node.op_type}", [a.name, a.scale, a.zero_point, b.name, b.scale, b.zero_point, y.scale, y.zero_point],
            [y.name], name=q.fresh_name(f"{node.name}_quant"), domain=MS_DOMAIN,
        )]

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

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QLinearConcat(Y_scale, Y_zp, X1, X1_scale, X1_zp, ...); input scales may differ."""
        xs, y = [q.input(i) for i in range(len(node.input))], q.output(0)
        if y is None or any(x is None for x in xs):
            return LeaveFloat("its inputs and output are not all quantized")
        bad = check_kernel_types([*xs, y])
        if bad is not None:
            return bad
        inputs = [y.scale, y.zero_point]
        for x in xs:
            inputs += [x.name, x.scale, x.zero_point]
        kernel = helper.make_node("QLinearConcat", inputs, [y.name], name=q.fresh_name(f"{node.name}_quant"), domain=MS_DOMAIN)
        kernel.attribute.extend(node.attribute)
        return [kernel]


@hookimpl
def ortq_register_op_quantizers(register):
    register(BinaryElementwiseQuantizer)
    register(ConcatQuantizer)
