"""The ``cpu`` target: ONNX Runtime's CPU execution provider, the default.

Scheme: uint8 asymmetric activations with int8 symmetric per-channel weights and int32 biases. That is
the combination ONNX Runtime's x86/ARM kernels fuse into QLinearConv, QLinearMatMul and QGemm on their
fast path (uint8 weights select a kernel about 4x slower; int8 activations get rewritten to uint8
anyway). Asymmetric activations put a ReLU's zero point at 0, which lets ReLU fold into the producing
kernel. Softmax, non-global AveragePool, Pad, HardSigmoid, ConvTranspose and linear Resize have no CPU
integer kernel or a slower one and stay float unless the user names them in op_types_to_quantize; every
other op with an op quantizer (third-party ones included) is quantized by default.

In transformer blocks (attention + LayerNorm, found structurally) only the MatMul/Gemm inputs and weights
are quantized: the residual stream's outlier channels do not fit one 8-bit scale, and ONNX Runtime fuses the
float bias/residual/LayerNorm/GELU chain that remains (``transformer_policy``). Word-embedding tables are
stored in 8 bits and gathered as such (``quantize_embeddings``). Both measured in docs/accuracy.md.

``reduce_range`` (7-bit weights) defaults to ``auto``: on an x86 CPU without VNNI (AVX2 only), the u8 x s8
multiply-add pairs saturate 16-bit intermediates and 7-bit weights avoid that; with VNNI/AMX (and on ARM)
the full 8 bits are exact and measured no slower, so they are kept. Quantize on (or set the option for)
the CPU the model will run on.
"""

from __future__ import annotations

import platform
from pathlib import Path

import onnx

from ortq.core.backend import Backend
from ortq.core.config import QuantConfig
from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import PlanContext
from ortq.core.options import option_bool


def cpu_lacks_vnni(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU whose flags show no VNNI (``avx512_vnni``, ``avx_vnni``) or AMX."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i686", "x86"} and cpuinfo is None:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False  # unknown: keep full 8-bit weights, ONNX Runtime's default
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool(flags) and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


class CpuBackend(Backend):
    name = "cpu"
    description = "ONNX Runtime CPU execution provider (u8 activations, s8 per-channel weights)"
    # Measured on ONNX Runtime's CPU provider (see the README): these have no integer kernel, or a slower one.
    excluded_op_types = frozenset({"Softmax", "AveragePool", "Pad", "HardSigmoid", "ConvTranspose"})

    def __init__(self, reduce_range: bool | str = "auto") -> None:
        auto = isinstance(reduce_range, str) and reduce_range.strip().lower() == "auto"
        self.reduce_range = cpu_lacks_vnni() if auto else option_bool("reduce_range", reduce_range)

    def default_config(self) -> QuantConfig:
        config = super().default_config()
        config.weight = config.weight.__class__(
            config.weight.qtype, config.weight.symmetric, config.weight.axis, self.reduce_range
        )
        # Measured on a real sentence transformer (docs/accuracy.md, Transformers): more accurate and faster.
        config.transformer_policy = True
        config.quantize_embeddings = True
        return config

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        if node.op_type == "Resize" and ctx.config.op_types is None:
            if ctx.string_attribute(node, "mode", "nearest") != "nearest":
                return "only nearest Resize runs on 8-bit data on the CPU provider"
        return None


@hookimpl
def ortq_register_backends(register):
    register(CpuBackend)
