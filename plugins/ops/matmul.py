"""MatMul and Gemm with a constant weight: QLinearMatMul / MatMulIntegerToFloat / QGemm on the CPU."""

from __future__ import annotations

import onnx

from ortq import Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, Weight, hookimpl


class MatMulQuantizer(OpQuantizer):
    op_types = ("MatMul",)
    float_output_ok = True  # DQ -> MatMul with a float output fuses into MatMulIntegerToFloat

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        b = node.input[1]
        if ctx.is_constant(b):
            shape = ctx.index.shape(b) or []
            if len(shape) < 2:
                return LeaveFloat(f"weight {b!r} is not a matrix")
            # Per-column scales: B is [..., K, N], the output features lie on the last axis.
            return NodePlan(
                inputs={0: Activation(), 1: Weight(axis=ctx.weight_axis(len(shape) - 1))}, outputs={0: Activation()}
            )
        if ctx.config.matmul_const_b_only:
            return LeaveFloat(
                "both inputs are activations (as in attention scores); the integer kernel for that is no "
                "faster than float on CPU (set matmul_const_b_only=False to quantize it anyway)"
            )
        return NodePlan(inputs={0: Activation(), 1: Activation()}, outputs={0: Activation()})


class GemmQuantizer(OpQuantizer):
    op_types = ("Gemm",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if not ctx.is_constant(node.input[1]):
            return LeaveFloat(f"B input {node.input[1]!r} is not a constant weight")
        trans_b = int(ctx.attribute(node, "transB", 0))
        inputs = {0: Activation(), 1: Weight(axis=ctx.weight_axis(0 if trans_b else 1))}
        alpha = float(ctx.attribute(node, "alpha", 1.0))
        beta = float(ctx.attribute(node, "beta", 1.0))
        if len(node.input) > 2 and node.input[2]:
            c_shape = ctx.index.shape(node.input[2]) or []
            # An int32 bias must be exactly alpha*A*B's scale per output column: only a [N] C with unit factors.
            if alpha == 1.0 and beta == 1.0 and len(c_shape) == 1:
                inputs[2] = Bias(input=0, weight=1)
        return NodePlan(inputs=inputs, outputs={0: Activation()})


@hookimpl
def ortq_register_op_quantizers(register):
    register(MatMulQuantizer)
    register(GemmQuantizer)
