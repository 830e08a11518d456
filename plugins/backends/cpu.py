"""The ``cpu`` target: ONNX Runtime's CPU execution provider, the default.

Scheme: uint8 asymmetric activations with int8 symmetric per-channel weights and int32 biases. That is
the combination ONNX Runtime's x86/ARM kernels fuse into QLinearConv, QLinearMatMul and QGemm on their
fast path (uint8 weights select a kernel about 4x slower; int8 activations get rewritten to uint8
anyway). Asymmetric activations put a ReLU's zero point at 0, which lets ReLU fold into the producing
kernel. Op types are limited to those that run faster as integer kernels; Softmax, non-global
AveragePool, Pad, HardSigmoid, ConvTranspose and linear Resize have no CPU integer kernel or a slower one
and stay float unless the user asks for them explicitly.
"""

from __future__ import annotations

import onnx

from ortq import Backend, PlanContext, hookimpl


class CpuBackend(Backend):
    name = "cpu"
    description = "ONNX Runtime CPU execution provider (u8 activations, s8 per-channel weights)"
    default_op_types = frozenset({
        "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat",
        "Relu", "Clip", "LeakyRelu", "Sigmoid",
        "MaxPool", "GlobalMaxPool", "GlobalAveragePool",
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split",
        "Expand", "Tile", "Identity", "Resize",
    })

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        if node.op_type == "Resize" and ctx.config.op_types == self.default_op_types:
            mode = ctx.attribute(node, "mode", b"nearest")
            if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest":
                return "only nearest Resize runs on 8-bit data on the CPU provider"
        return None


@hookimpl
def ortq_register_backends(register):
    register(CpuBackend)
