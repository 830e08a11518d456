"""ESP-DL's optimizer step on the float model: BatchNormalization folding, Add-bias folding into Conv, and a
dynamic batch axis, built on ortq's core graph passes (:mod:`ortq.graph_passes`).

ESP-DL's quantization toolkit runs the same three steps before calibrating (its overview page,
``espressif/esp-dl`` ``docs/en/tools/quantization-toolkit/quantization-toolkit-overview.rst``: onnxoptimizer's
``fuse_bn_into_conv`` and ``fuse_add_bias_into_conv`` passes, then ``convert_model_batch_to_dynamic``), and
stresses that BN fusion must happen before quantization: the chip has no BatchNormalization kernel. The Add
is folded into Conv only, as onnxoptimizer does: a MatMul's bias Add is an ESP-DL kernel input of its own.

Unlike the core passes (which return counts), these return the edited model, as the backend's ``prepare``
hook does.
"""

from __future__ import annotations

import onnx

from ortq.pipeline import graph_passes

__all__ = ["fold_batch_norm", "fold_add_bias", "make_batch_dynamic", "optimize_for_esp_dl"]

#: Where ESP-DL folds a following constant Add (onnxoptimizer's ``fuse_add_bias_into_conv``).
ADD_BIAS_INTO = ("Conv",)


def fold_batch_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold BatchNormalization into the Conv / ConvTranspose / Gemm / 2-D MatMul before it (a BN the chip
    could not run otherwise); see :func:`ortq.pipeline.graph_passes.fold_batch_norm`."""
    graph_passes.fold_batch_norm(model)
    return model


def fold_add_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ``Conv(x, W[, B]) + c`` into the Conv's bias when ``c`` is constant per output channel."""
    graph_passes.fold_add_bias(model, into=ADD_BIAS_INTO)
    return model


def make_batch_dynamic(model: onnx.ModelProto, dim_param: str = "batch") -> onnx.ModelProto:
    """Axis 0 of every graph input and output symbolic; see :func:`ortq.pipeline.graph_passes.make_batch_dynamic`."""
    graph_passes.make_batch_dynamic(model, dim_param)
    return model


def optimize_for_esp_dl(model: onnx.ModelProto) -> onnx.ModelProto:
    """The toolkit's optimizer step: BN folding, Add-bias folding, dynamic batch."""
    return make_batch_dynamic(fold_add_bias(fold_batch_norm(model)))
