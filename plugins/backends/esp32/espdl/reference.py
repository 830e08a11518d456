"""An integer reference for ``.espdl`` models: what ESP-DL v3 computes on ESP32-S3 and ESP32-P4, in numpy.

Every tensor is an int8 / int16 array with a power-of-two exponent (``real = q * 2**exponent``, the exponent
from the file's value info), feature maps NHWC as stored. The arithmetic follows ESP-DL v3's kernels
(``espressif/esp-dl`` master, ``esp-dl/dl/base``, read through the search tool; not copied):

* Conv / Gemm (``dl_base.hpp`` ``get_conv_operation_args``, ``dl_base_activate_buffer.hpp``, the
  ``dl_esp32p4_s8_conv2d`` kernels): the bias is loaded into the accumulator as stored (it is at the
  exponent input + filter), the products are accumulated exactly, then one shift by ``mac_shift = output -
  filter - input`` (per output channel for per-channel filters) rounds in the chip's mode and saturates
  (``esp.srcmb``); a fused ``Relu`` clamps at 0. ESP32-S3's loader keeps only the low 20 bits of an int8
  bias for the channels in whole 16-channel blocks (``TensorBase::reset_bias_layout``), so such a bias is
  wrapped to 20 bits here as well.
* Rounding: ESP32-S3 rounds half up, ESP32-P4 half to even (``dl_esp32p4_cfg_round(ROUND_MODE_HALF_EVEN)``;
  ``operator_support_state.md``).
* AveragePool / GlobalAveragePool (``dl_base_pool2d.hpp``): the window sum times an integer
  ``1/area`` at ``pool_exponent`` (``calculate_exponent``: float search against 127 / 32767 on P4, integer
  search against 64 / 16384 on S3; the multiplier rounded on P4, floored on S3), then one rounding shift by
  ``output - pool_exponent - input``. The window area is the full kernel, padding included.
* RequantizeLinear (``dl_base_requantize_linear.cpp``): one rounding shift by ``output - input`` (a
  multiplication when negative), saturated.
* Add: a saturating add of integers already at the output's exponent (esp-ppq aligns element-wise inputs to
  the output and inserts RequantizeLinear where they differ); Mul: the product shifted by ``output - input0 -
  input1`` with the chip's rounding (``get_elemwise_operation_args``'s ``mul_shift``).
* Ops with a ``lut`` attribute (esp-ppq's ``AddLUTPattern``: Sigmoid, Tanh, LeakyRelu, Clip, ...): int8
  ``output = lut[input + 128]`` with the table's exponent.
* MaxPool, Relu, Reshape, Flatten, Transpose, Concat move integers and keep the exponent.

What is not modelled: the S3's 20-bit int8 accumulator lanes overflowing (the sums are exact here;
:attr:`Reference.overflows` counts the outputs whose accumulator would not fit 20 bits), int16 LUTs
(esp-ppq's interpolated ``int16_lut_step`` tables), Resize and the ops not listed above (refused by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ortq.plugins.backends.esp32.espdl.layout import unpack_filter
from ortq.plugins.backends.esp32.espdl.reader import EspdlError, EspdlModel, EspdlNode, EspdlTensor

__all__ = ["CHIP_ROUNDING", "HALF_UP", "HALF_EVEN", "Reference", "run_reference", "check_test_values", "round_shift", "pool_factor"]

HALF_UP = "ROUND_HALF_UP"
HALF_EVEN = "ROUND_HALF_EVEN"
CHIP_ROUNDING = {"esp32s3": HALF_UP, "esp32p4": HALF_EVEN}

_EXACT = float(2**53)


def round_shift(x: np.ndarray, shift, mode: str) -> np.ndarray:
    """``x / 2**shift`` rounded to an integer in ``mode`` (exact, int64); ``shift <= 0`` multiplies."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), x.shape)
    right = np.maximum(shift, 0)
    up = x << np.maximum(-shift, 0)
    q = x >> right
    rem = x - (q << right)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 0)
    if mode == HALF_UP:
        bump = (right > 0) & (rem >= half)
    elif mode == HALF_EVEN:
        bump = (right > 0) & ((rem > half) | ((rem == half) & (q & 1 == 1)))
    else:
        raise ValueError(f"unknown rounding mode {mode!r}")
    return np.where(shift > 0, q + bump, up)


def pool_factor(area: int, bits: int, chip: str) -> tuple[int, int]:
    """(``avg_pool_area_inv``, ``pool_exponent``) of ESP-DL's average pooling for a window of ``area``."""
    if chip == "esp32p4":
        exp = 6 if bits == 8 else 14
        value = np.float32((127 if bits == 8 else 32767) / (1 << exp))
        inv_n = np.float32(1.0) / np.float32(area)
        while value > inv_n:
            exp += 1
            value = np.float32(value / np.float32(2))
        exp -= 1
        factor = float(np.float32(np.float32(1.0) / np.float32(area)) * np.float32(1 << exp))
        inv = int(np.rint(factor))  # tool::round on P4 rounds half to even
    else:
        limit = 64 if bits == 8 else 16384
        exp, tmp = 0, (1 // area)
        while tmp < limit:
            exp += 1
            tmp = (1 << exp) // area
        exp -= 1
        inv = (1 << exp) // area
    return inv, -exp


@dataclass
class _Stats:
    overflows: dict[str, int] = field(default_factory=dict)


class Reference:
    """Runs one :class:`EspdlModel` as ``chip`` (``esp32s3`` or ``esp32p4``) would."""

    def __init__(self, model: EspdlModel, chip: str) -> None:
        if chip not in CHIP_ROUNDING:
            raise EspdlError(f"the reference runs esp32s3 or esp32p4 models, not {chip!r}")
        self.model = model
        self.graph = model.graph
        self.chip = chip
        self.mode = CHIP_ROUNDING[chip]
        self.overflows: dict[str, int] = {}
        self.exponents: dict[str, int] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for vi in (*self.graph.value_info, *self.graph.inputs, *self.graph.outputs):
            if vi.exponents:
                self.exponents[vi.name] = int(vi.exponents[0])
            if vi.dtype is not None:
                self.dtypes[vi.name] = vi.dtype

    # -- helpers -------------------------------------------------------------------------------------------
    def exponent(self, name: str) -> int:
        if name in self.exponents:
            return self.exponents[name]
        if name in self.graph.initializers:
            return self.graph.initializers[name].exponent
        raise EspdlError(f"tensor {name!r} has no exponent in the file")

    def saturate(self, x: np.ndarray, name: str) -> np.ndarray:
        dtype = self.dtypes.get(name)
        if dtype is None or dtype.kind not in "iu":
            raise EspdlError(f"tensor {name!r}: its element type is not an integer the chip computes in")
        info = np.iinfo(dtype)
        return np.clip(x, info.min, info.max).astype(dtype)

    def init(self, name: str) -> EspdlTensor:
        try:
            return self.graph.initializers[name]
        except KeyError:
            raise EspdlError(f"initializer {name!r} is missing") from None

    # -- running -----------------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every tensor the graph computes (integers as stored: NHWC feature maps), by name. ``inputs``
        default to the file's embedded test inputs."""
        if inputs is None:
            inputs = {k: v.data for k, v in self.graph.test_inputs.items()}
        values: dict[str, np.ndarray] = {}
        for vi in self.graph.inputs:
            if vi.name not in inputs:
                raise EspdlError(f"no value for the model input {vi.name!r}")
            x = np.asarray(inputs[vi.name])
            if vi.dtype is not None and x.dtype != vi.dtype:
                raise EspdlError(f"input {vi.name!r} is {x.dtype}, the model takes {vi.dtype}")
            values[vi.name] = x
        for node in self.graph.nodes:
            handler = self._handler(node)
            args = [values[t] if t in values else None for t in node.inputs]
            out = handler(node, args)
            values[node.outputs[0]] = out
        return values

    def _handler(self, node: EspdlNode) -> Callable[[EspdlNode, list], np.ndarray]:
        if "lut" in node.attributes and node.op_type not in ("Conv", "Gemm"):
            return self.op_lut
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None:
            raise EspdlError(f"node {node.name!r}: the reference has no {node.op_type} kernel")
        return handler

    # -- kernels -------------------------------------------------------------------------------------------
    def _filter(self, node: EspdlNode, depthwise: bool) -> np.ndarray:
        t = self.init(node.inputs[1])
        layout = (t.layout or "").upper()
        blocked = not (layout.startswith("NHWC") or layout.startswith("HWCN") or layout.startswith("NCHW"))
        if len(t.dims) != 4:
            raise EspdlError(f"node {node.name!r}: filter {t.name!r} has dims {t.dims}, expected 4")
        return unpack_filter(t.data, t.dims, depthwise, blocked).astype(np.int64)

    def _finish(self, node: EspdlNode, acc: np.ndarray, w: EspdlTensor, in_name: str, depthwise: bool) -> np.ndarray:
        """Bias, one rounding shift per output channel, saturation, the fused activation."""
        out = node.outputs[0]
        n_out = acc.shape[-1]
        if len(node.inputs) > 2 and node.inputs[2]:
            b = self.init(node.inputs[2]).data.astype(np.int64).reshape(-1)
            if self.chip == "esp32s3" and w.dtype == np.int8:
                aligned = n_out if depthwise else n_out // 16 * 16
                low = (b[:aligned] & 0xFFFFF) ^ 0x80000
                b = np.concatenate([low - 0x80000, b[aligned:]])
            acc = acc + b
        if self.chip == "esp32s3" and w.dtype == np.int8:
            limit = 1 << 19
            self.overflows[out] = int(np.count_nonzero((acc < -limit) | (acc >= limit)))
        w_exp = np.asarray(w.exponents, dtype=np.int64)
        if w_exp.size not in (1, n_out):
            raise EspdlError(f"node {node.name!r}: {w_exp.size} filter exponents for {n_out} output channels")
        shift = self.exponent(out) - self.exponent(in_name) - w_exp
        y = round_shift(acc, shift, self.mode)
        activation = node.attributes.get("activation", "Linear")
        y = self.saturate(y, out)
        if activation == "Relu":
            y = np.maximum(y, 0)
        elif activation not in ("Linear", None):
            raise EspdlError(f"node {node.name!r}: fused activation {activation!r} is not modelled")
        return y

    def op_Conv(self, node: EspdlNode, args: list) -> np.ndarray:
        x = np.asarray(args[0]).astype(np.int64)
        if x.ndim != 4:
            raise EspdlError(f"node {node.name!r}: 2-D Conv on NHWC input expected, got shape {x.shape}")
        group = int(node.attributes.get("group", 1))
        depthwise = group > 1
        w = self._filter(node, depthwise)  # [M, C/g, kh, kw]
        m, cg, kh, kw = w.shape
        n, h, wd, c = x.shape
        if depthwise and not (cg == 1 and group == c and m == c):
            raise EspdlError(f"node {node.name!r}: group={group} is neither 1 nor depthwise (ESP-DL supports only those)")
        sh, sw = node.attributes.get("strides", [1, 1])
        dh, dw = node.attributes.get("dilations", [1, 1])
        pt, pl, pb, pr = node.attributes.get("pads", [0, 0, 0, 0])
        xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
        ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
        cols = np.empty((n, oh, ow, kh, kw, c), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j, :] = xp[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw, :]
        bound = float(np.abs(x).max(initial=0)) * float(np.abs(w).max(initial=0)) * kh * kw * cg
        calc = np.float64 if bound < _EXACT else np.int64
        if depthwise:
            acc = np.einsum("nhwijc,cij->nhwc", cols.astype(calc), w[:, 0].astype(calc))
        else:
            wm = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, m)  # [(i, j, c), m]
            acc = cols.reshape(n * oh * ow, kh * kw * c).astype(calc) @ wm.astype(calc)
            acc = acc.reshape(n, oh, ow, m)
        return self._finish(node, np.asarray(acc).astype(np.int64), self.init(node.inputs[1]), node.inputs[0], depthwise)

    def op_Gemm(self, node: EspdlNode, args: list) -> np.ndarray:
        x = np.asarray(args[0]).astype(np.int64)
        if int(node.attributes.get("transA", 0)) or int(node.attributes.get("transB", 0)):
            raise EspdlError(f"node {node.name!r}: transA/transB must be 0 in an .espdl Gemm (the filter is re-laid)")
        w = self._filter(node, False)  # [N, K, 1, 1]
        wm = w[:, :, 0, 0].T  # [K, N]
        bound = float(np.abs(x).max(initial=0)) * float(np.abs(wm).max(initial=0)) * wm.shape[0]
        calc = np.float64 if bound < _EXACT else np.int64
        acc = np.asarray(x.astype(calc) @ wm.astype(calc)).astype(np.int64)
        return self._finish(node, acc, self.init(node.inputs[1]), node.inputs[0], False)

    def op_RequantizeLinear(self, node: EspdlNode, args: list) -> np.ndarray:
        out = node.outputs[0]
        shift = self.exponent(out) - self.exponent(node.inputs[0])
        return self.saturate(round_shift(np.asarray(args[0]), shift, self.mode), out)

    def _same_exponent(self, node: EspdlNode, names: list[str]) -> None:
        e_out = self.exponent(node.outputs[0])
        for t in names:
            if self.exponent(t) != e_out:
                raise EspdlError(
                    f"node {node.name!r} ({node.op_type}): input {t!r} is at exponent {self.exponent(t)}, the output "
                    f"at {e_out}; ESP-DL does not rescale here (a RequantizeLinear must come first)"
                )

    def op_Add(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:2])
        return self.saturate(np.asarray(args[0], np.int64) + np.asarray(args[1], np.int64), node.outputs[0])

    def op_Mul(self, node: EspdlNode, args: list) -> np.ndarray:
        out = node.outputs[0]
        shift = self.exponent(out) - self.exponent(node.inputs[0]) - self.exponent(node.inputs[1])
        prod = np.asarray(args[0], np.int64) * np.asarray(args[1], np.int64)
        return self.saturate(round_shift(prod, shift, self.mode), out)

    def op_Relu(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        return np.maximum(np.asarray(args[0]), 0).astype(args[0].dtype)

    def op_lut(self, node: EspdlNode, args: list) -> np.ndarray:
        table = self.init(node.attributes["lut"])
        x = np.asarray(args[0])
        if x.dtype != np.int8 or table.data.size != 256:
            raise EspdlError(f"node {node.name!r}: only int8 lookup tables (256 entries) are modelled")
        if table.exponent != self.exponent(node.outputs[0]):
            raise EspdlError(f"node {node.name!r}: the table's exponent differs from its output's")
        return table.data.reshape(-1)[x.astype(np.int64) + 128].astype(self.dtypes.get(node.outputs[0], table.dtype))

    def _windows(self, x: np.ndarray, node: EspdlNode, fill: int) -> np.ndarray:
        kh, kw = node.attributes["kernel_shape"]
        sh, sw = node.attributes.get("strides", [1, 1])
        pt, pl, pb, pr = node.attributes.get("pads", [0, 0, 0, 0])
        xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
        oh = (xp.shape[1] - kh) // sh + 1
        ow = (xp.shape[2] - kw) // sw + 1
        win = np.empty((x.shape[0], oh, ow, kh * kw, x.shape[3]), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                win[:, :, :, i * kw + j] = xp[:, i: i + sh * (oh - 1) + 1: sh, j: j + sw * (ow - 1) + 1: sw]
        return win

    def op_MaxPool(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        x = np.asarray(args[0])
        return self._windows(x.astype(np.int64), node, int(np.iinfo(x.dtype).min)).max(axis=3).astype(x.dtype)

    def op_GlobalMaxPool(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        x = np.asarray(args[0])
        return x.max(axis=(1, 2), keepdims=True)

    def _average(self, node: EspdlNode, total: np.ndarray, area: int, dtype: np.dtype) -> np.ndarray:
        inv, pool_exp = pool_factor(area, dtype.itemsize * 8, self.chip)
        shift = self.exponent(node.outputs[0]) - pool_exp - self.exponent(node.inputs[0])
        return self.saturate(round_shift(total * inv, shift, self.mode), node.outputs[0])

    def op_AveragePool(self, node: EspdlNode, args: list) -> np.ndarray:
        x = np.asarray(args[0])
        kh, kw = node.attributes["kernel_shape"]
        return self._average(node, self._windows(x.astype(np.int64), node, 0).sum(axis=3), kh * kw, x.dtype)

    def op_GlobalAveragePool(self, node: EspdlNode, args: list) -> np.ndarray:
        x = np.asarray(args[0])
        total = x.astype(np.int64).sum(axis=(1, 2), keepdims=True)
        return self._average(node, total, x.shape[1] * x.shape[2], x.dtype)

    def op_Reshape(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        shape = [int(d) for d in self.init(node.inputs[1]).data.reshape(-1)]
        x = np.asarray(args[0])
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)

    def op_Flatten(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        x = np.asarray(args[0])
        axis = int(node.attributes.get("axis", 1)) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)

    def op_Transpose(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs[:1])
        x = np.asarray(args[0])
        return x.transpose(node.attributes.get("perm", list(range(x.ndim))[::-1]))

    def op_Concat(self, node: EspdlNode, args: list) -> np.ndarray:
        self._same_exponent(node, node.inputs)
        return np.concatenate([np.asarray(a) for a in args], axis=int(node.attributes["axis"]))


def run_reference(model: EspdlModel, chip: str, inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The model's outputs (integers, as stored) computed as ``chip`` would; inputs default to the embedded test
    inputs."""
    values = Reference(model, chip).run(inputs)
    return {vi.name: values[vi.name] for vi in model.graph.outputs}


def check_test_values(model: EspdlModel, chip: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(embedded expected, reference) integers for every embedded test output, after running the embedded test
    inputs; the shapes and exponents must match the file's."""
    if not model.graph.test_inputs or not model.graph.test_outputs:
        raise EspdlError("the model embeds no test inputs/outputs")
    ref = Reference(model, chip)
    values = ref.run()
    result = {}
    for name, expected in model.graph.test_outputs.items():
        if name not in values:
            raise EspdlError(f"test output {name!r} is not a tensor of the graph")
        if expected.exponents and ref.exponent(name) != expected.exponent:
            raise EspdlError(f"test output {name!r}: exponent {expected.exponent} vs the graph's {ref.exponent(name)}")
        result[name] = (expected.data, values[name].reshape(expected.data.shape))
    return result
