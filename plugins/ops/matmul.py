"""MatMul and Gemm with a constant weight: QLinearMatMul / MatMulIntegerToFloat / QGemm on the CPU."""

from __future__ import annotations

import onnx

import numpy as np
from onnx import helper

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, Weight
from ortq.pipeline.rewrite_qoperator import MS_DOMAIN, check_kernel_types, float_constant, int32_bias


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

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """QLinearMatMul with a quantized output; with a float output MatMulIntegerToFloat; MatMul + bias Add
        (ortq's fused Linear layer) QGemm for 2-D operands, else MatMulIntegerToFloat with the bias inside.
        """
        a, b, y = q.input(0), q.input(1), q.output(0)
        if a is None or b is None:
            return LeaveFloat("its inputs are not both quantized")
        b_rank = len(b.shape or [])
        if b.axis is not None and (b_rank != 2 or b.axis not in (1, -1)):
            return LeaveFloat(f"weight {b.name!r} is quantized along axis {b.axis}; the kernels take per-column 2-D weights")
        weight = b if b.constant else None
        bad = check_kernel_types([a] + ([] if weight else [b]) + ([y] if y else []), weight)
        if bad is not None:
            return bad
        name = q.fresh_name(f"{node.name}_quant")
        if y is not None:
            return [helper.make_node(
                "QLinearMatMul", [a.name, a.scale, a.zero_point, b.name, b.scale, b.zero_point, y.scale, y.zero_point],
                [y.name], name=name,
            )]
        bias_add = self._bias_add(node, q, b_rank)
        if bias_add is not None:
            add, bias_name, out = bias_add
            a_rank = len(a.shape or [])
            if out is not None and a_rank == 2 and weight is not None:
                bias = int32_bias(node, q, -1, a, b, bias_tensor=bias_name)
                if not isinstance(bias, LeaveFloat):
                    q.absorb(add)
                    return [helper.make_node(
                        "QGemm", [a.name, a.scale, a.zero_point, b.name, b.scale, b.zero_point, bias, out.scale, out.zero_point],
                        [out.name], name=name, domain=MS_DOMAIN,
                    )]
            values = float_constant(q, bias_name)
            if values is not None:
                q.absorb(add)
                bias = q.add_constant(f"{bias_name}_float", values.astype(np.float32))
                return [self._to_float(a, b, add.output[0], name, bias)]
        return [self._to_float(a, b, node.output[0], name)]

    @staticmethod
    def _to_float(a, b, output: str, name: str, bias: str = "") -> onnx.NodeProto:  # noqa: ANN001
        inputs = [a.name, b.name, a.scale, b.scale, a.zero_point, b.zero_point] + ([bias] if bias else [])
        return helper.make_node("MatMulIntegerToFloat", inputs, [output], name=name, domain=MS_DOMAIN)

    @staticmethod
    def _bias_add(node: onnx.NodeProto, q: QOperatorContext, b_rank: int):  # noqa: ANN205
        """(Add, bias tensor, quantized output or None) when the only reader of the output adds a constant
        vector of the output's width (the Linear layer's bias), else None."""
        found = q.epilogue(0)
        if found is None or found[0].op_type != "Add" or found[0].domain not in ("", "ai.onnx") or b_rank != 2:
            return None
        add, out = found
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        values = float_constant(q, other)
        width = (q.input(1).shape or [None])[-1]
        if values is None or values.ndim != 1 or values.size != width:
            return None
        return add, other, out


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

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C int32, y_scale, y_zp); without a
        quantized output QGemm writes float (y_scale and y_zero_point left out)."""
        a, b, y = q.input(0), q.input(1), q.output(0)
        if a is None or b is None or not b.constant:
            return LeaveFloat("its input and constant weight are not both quantized")
        trans_b = int(q.attribute(node, "transB", 0))
        if b.axis is not None and b.axis != (0 if trans_b else 1):
            return LeaveFloat(f"weight {b.name!r} is quantized along axis {b.axis}, not its output columns")
        bad = check_kernel_types([a] + ([y] if y else []), b)
        if bad is not None:
            return bad
        inputs = [a.name, a.scale, a.zero_point, b.name, b.scale, b.zero_point]
        if len(node.input) > 2 and node.input[2]:
            if float(q.attribute(node, "beta", 1.0)) != 1.0 or float(q.attribute(node, "alpha", 1.0)) != 1.0:
                return LeaveFloat("alpha or beta is not 1, so the bias has no int32 form at input x weight scale")
            bias = int32_bias(node, q, 2, a, b)
            if isinstance(bias, LeaveFloat):
                return bias
            inputs.append(bias)
        elif y is not None:
            inputs.append("")
        outputs = [node.output[0]]
        if y is not None:
            inputs += [y.scale, y.zero_point]
            outputs = [y.name]
        kernel = helper.make_node("QGemm", inputs, outputs, name=q.fresh_name(f"{node.name}_quant"), domain=MS_DOMAIN)
        kernel.attribute.extend(x for x in node.attribute if x.name in ("alpha", "transA", "transB"))
        return [kernel]


@hookimpl
def ortq_register_op_quantizers(register):
    register(MatMulQuantizer)
    register(GemmQuantizer)
