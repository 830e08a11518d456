"""The ``cpu`` target: ONNX Runtime's CPU execution provider, the default.

Scheme: uint8 asymmetric activations with int8 symmetric per-channel weights and int32 biases. That is
the combination ONNX Runtime's x86/ARM kernels fuse into QLinearConv, QLinearMatMul and QGemm on their
fast path (uint8 weights select a kernel about 4x slower; int8 activations get rewritten to uint8
anyway). Asymmetric activations put a ReLU's zero point at 0, which lets ReLU fold into the producing
kernel. Softmax, non-global AveragePool, Pad, HardSigmoid, ConvTranspose and linear Resize have no CPU
integer kernel or a slower one and stay float unless the user names them in op_types_to_quantize; every
other op with an op quantizer (third-party ones included) is quantized by default.
"""

from __future__ import annotations

import onnx

from ortq import Backend, PlanContext, hookimpl


class CpuBackend(Backend):
    name = "cpu"
    description = "ONNX Runtime CPU execution provider (u8 activations, s8 per-channel weights)"
    # Measured on ONNX Runtime's CPU provider (see the README): these have no integer kernel, or a slower one.
    excluded_op_types = frozenset({"Softmax", "AveragePool", "Pad", "HardSigmoid", "ConvTranspose"})

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        if node.op_type == "Resize" and ctx.config.op_types is None:
            if ctx.string_attribute(node, "mode", "nearest") != "nearest":
                return "only nearest Resize runs on 8-bit data on the CPU provider"
        return None


@hookimpl
def ortq_register_backends(register):
    register(CpuBackend)
