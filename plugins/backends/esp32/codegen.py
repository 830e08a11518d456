"""C++ coefficient files for ESP-DL, in the shape of its toolkit's ``export_coefficient_to_cpp``.

ESP-DL's ``Calibrator.export_coefficient_to_cpp(model, pickle, target_chip, output_path, file_name)``
writes ``<file_name>.hpp`` declaring one getter per layer coefficient (``get_<layer>_filter()``,
``get_<layer>_bias()``, ``get_<layer>_activation()`` returning ``const dl::Filter<T> *`` etc.) inside a
namespace named like the files, and ``<file_name>.cpp`` defining 16-byte-aligned element arrays and the
``dl::`` objects (``espressif/esp-dl``: ``docs/en/tools/quantization-toolkit/quantization-toolkit-api.rst``,
``docs/en/tutorials/deploying-models.rst`` and its ``tutorial/quantization_tool_example/model/
mnist_coefficient.hpp``; a Gemm becomes a 1x1 convolution filter there). The types are those of
``include/typedef/dl_constant.hpp`` (see ``chips.py`` for the constructor signatures used).

What we write for a model named ``NAME`` (the ``name`` backend option):

* ``NAME_coefficient.hpp``: ``namespace NAME_coefficient`` with, per layer, ``constexpr int``
  ``<layer>_input_exponent`` / ``<layer>_output_exponent`` and the getters; per graph input and output its
  exponent; per layer without coefficients (pooling, Add, Concat, ...) its output exponent. A comment on each
  layer gives its geometry (kernel, strides, ONNX pads [top, left, bottom, right], dilations, group).
* ``NAME_coefficient.cpp``: ``alignas(16)`` element arrays of ``int8_t`` / ``int16_t`` (weights) and
  ``int32_t`` / ``int64_t`` (biases, by the chip's bias width), per-channel exponent arrays (``int8_t``, the
  type ``dl::Filter``'s per-channel constructor takes), and the ``dl::Filter`` / ``dl::Bias`` /
  ``dl::Activation`` objects behind the getters.

Filter element order (``filter_layout``), from esp-ppq's exporter (``chips.py`` [PPQ-LAYOUT]): ESP32 NHWC
(depthwise HWCN); ESP32-S3 and ESP32-P4 blocks of 16 (int8) / 8 (int16) output channels, each block H, W,
C with the block's channels innermost, the remainder channels after the blocks in NHWC (depthwise: CHWN).
The declared shape is always ESP-DL's fixed [kernel_h, kernel_w, in_channels, out_channels]
([kernel_h, kernel_w, channels, 1] for depthwise). Per-channel exponents are in natural output-channel
order. A per-channel bias is stored at each channel's accumulator exponent; ``dl::Bias`` has one exponent,
so the object carries the input exponent and channel ``c``'s bias is at
``bias->exponent + filter->channel_exponent[c]`` (our convention; ESP-DL v1 had no per-channel bias).

Files are written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations


import numpy as np

from ortq.plugins.backends.esp32.chips import ChipSpec
from ortq.plugins.backends.esp32.qdq import Layer, QdqGraph, c_identifier

__all__ = ["filter_layout", "filter_unlayout", "layer_filter", "render", "report_text"]

_PER_LINE = 24


def filter_layout(w: np.ndarray, spec: ChipSpec, depthwise: bool = False) -> tuple[np.ndarray, list[int]]:
    """ONNX filter [M, C/g, kh, kw] -> (elements in the chip's order, ESP-DL's declared shape)."""
    m, c, kh, kw = w.shape
    nhwc = np.ascontiguousarray(w.transpose(0, 2, 3, 1))  # [M, kh, kw, C]
    declared = [kh, kw, m, 1] if depthwise else [kh, kw, c, m]
    if not spec.blocked_filters:
        flat = nhwc.transpose(1, 2, 3, 0) if depthwise else nhwc  # depthwise: HWCN
        return flat.reshape(-1), declared
    a = spec.align
    aligned = m // a * a
    head = nhwc[:aligned].reshape(m // a, a, kh, kw, c).transpose(0, 2, 3, 4, 1)  # (M/a) H W C (a)
    tail = nhwc[aligned:]
    if depthwise:
        tail = tail.transpose(3, 1, 2, 0)  # CHWN
    return np.concatenate([head.reshape(-1), tail.reshape(-1)]), declared


def filter_unlayout(flat: np.ndarray, shape: tuple[int, int, int, int], spec: ChipSpec, depthwise: bool = False) -> np.ndarray:
    """Inverse of :func:`filter_layout`: the chip's elements back to ONNX [M, C/g, kh, kw]."""
    m, c, kh, kw = shape
    flat = np.asarray(flat).reshape(-1)
    if not spec.blocked_filters:
        if depthwise:
            return flat.reshape(kh, kw, c, m).transpose(3, 2, 0, 1)
        return flat.reshape(m, kh, kw, c).transpose(0, 3, 1, 2)
    a = spec.align
    aligned = m // a * a
    n_head = aligned * kh * kw * c
    head = flat[:n_head].reshape(m // a, kh, kw, c, a).transpose(0, 4, 1, 2, 3).reshape(aligned, kh, kw, c)
    rest = m - aligned
    tail = flat[n_head:]
    tail = tail.reshape(c, kh, kw, rest).transpose(3, 1, 2, 0) if depthwise else tail.reshape(rest, kh, kw, c)
    return np.concatenate([head, tail]).transpose(0, 3, 1, 2)


def layer_filter(layer: Layer) -> np.ndarray:
    """The layer's weight as an ONNX conv filter [M, C/g, kh, kw] (a [K, N] matrix becomes [N, K, 1, 1])."""
    w = layer.weight.values
    return w if layer.kernel.op_type == "Conv" else w.T[:, :, None, None]


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    values = np.asarray(values).reshape(-1)
    rows = [
        "    " + ", ".join(str(int(v)) for v in values[i:i + _PER_LINE]) + ","
        for i in range(0, len(values), _PER_LINE)
    ]
    body = "\n".join(rows) if rows else "    0,"
    return f"alignas(16) const {ctype} {name}[{max(len(values), 1)}] = {{\n{body}\n}};"


def _ints(values) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"


def _geometry(layer: Layer) -> str:
    if layer.kernel.op_type != "Conv":
        k, n = layer.weight.values.shape
        return f"{layer.kernel.op_type} {k} -> {n} (a 1x1 Conv2D filter)"
    _, _, kh, kw = layer.weight.values.shape
    a = layer.attrs
    kind = "depthwise Conv2D" if layer.depthwise else "Conv2D"
    return (
        f"{kind} {kh}x{kw}, stride {list(a.get('strides') or [1, 1])}, pads {list(a.get('pads') or [0, 0, 0, 0])}"
        f"{', auto_pad ' + a['auto_pad'] if a.get('auto_pad', 'NOTSET') not in ('NOTSET', '') else ''}, "
        f"dilation {list(a.get('dilations') or [1, 1])}, group {layer.group}"
    )


def render(graph: QdqGraph, name: str) -> tuple[str, str]:
    """(header, source) text for the model read by ``graph``."""
    spec = graph.spec
    ns = f"{name}_coefficient"
    layers = graph.layers()
    covered = graph.covered_nodes()
    used: set[str] = {layer.name for layer in layers.values()}
    hpp = [
        f"// ESP-DL coefficients for model '{name}', generated by ortq (target esp32, chip {spec.chip}).",
        f"// int{spec.bits} features and weights, {'per-channel' if any(l.weight.exponent.ndim for l in layers.values()) else 'per-tensor'}"
        f" weight exponents, {spec.bias_bits}-bit biases at the accumulator's exponent, {spec.rounding}.",
        "// real_value = int_value * 2^exponent. Do not edit: regenerate with `ortq export esp32`.",
        "#pragma once",
        "",
        "#include <stdint.h>",
        "",
        '#include "dl_constant.hpp"',
        "",
        f"namespace {ns} {{",
    ]
    for vi in graph.model.graph.input:
        if vi.name in graph.index.initializers:
            continue
        q = graph.output_quantizer(vi.name)
        if q is not None:
            ident = c_identifier(f"graph_input_{vi.name}", used)
            hpp.append(f"// model input '{vi.name}' (ESP-DL feature maps are HWC)")
            hpp.append(f"constexpr int {ident}_exponent = {int(graph.qdq_exponent(q).reshape(-1)[0])};")
    cpp = [f'#include "{ns}.hpp"', "", f"namespace {ns} {{", "namespace {", ""]
    getters: list[str] = []
    for node in graph.nodes:
        layer = layers.get(node.name)
        if layer is not None:
            _emit_layer(layer, spec, hpp, cpp, getters)
            continue
        if node.name in covered or node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        q = graph.output_quantizer(node.output[0])
        if q is None:
            continue
        ident = c_identifier(node.name or node.output[0], used)
        hpp.append("")
        hpp.append(f"// {node.name}: {node.op_type}")
        hpp.append(f"constexpr int {ident}_output_exponent = {int(graph.qdq_exponent(q).reshape(-1)[0])};")
    for vi in graph.model.graph.output:
        dq = graph.producer(vi.name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            e = graph.activation_exponent(vi.name)
            if e is not None:
                ident = c_identifier(f"graph_output_{vi.name}", used)
                hpp.append("")
                hpp.append(f"// model output '{vi.name}'")
                hpp.append(f"constexpr int {ident}_exponent = {e};")
    hpp += ["", f"}} // namespace {ns}", ""]
    cpp += ["} // namespace", "", *getters, "", f"}} // namespace {ns}", ""]
    return "\n".join(hpp), "\n".join(cpp)


def _emit_layer(layer: Layer, spec: ChipSpec, hpp: list[str], cpp: list[str], getters: list[str]) -> None:
    t, bt, n = spec.ctype, spec.bias_ctype, layer.name
    w = layer_filter(layer)
    flat, declared = filter_layout(w, spec, layer.depthwise)
    hpp.append("")
    hpp.append(f"// {layer.kernel.name}: {_geometry(layer)}, activation {layer.activation}")
    hpp.append(f"constexpr int {n}_input_exponent = {layer.input_exponent};")
    if layer.output_exponent is not None:
        hpp.append(f"constexpr int {n}_output_exponent = {layer.output_exponent};")
    hpp.append(f"const dl::Filter<{t}> *get_{n}_filter();")
    cpp.append(_array(t, f"{n}_filter_element", flat))
    dilation = list(layer.attrs.get("dilations") or [1, 1])
    if layer.weight.exponent.ndim:
        cpp.append(_array("int8_t", f"{n}_filter_channel_exponent", layer.weight.exponent))
        cpp.append(
            f"const dl::Filter<{t}> {n}_filter({n}_filter_element, {n}_filter_channel_exponent, "
            f"{layer.weight.exponent.size}, {_ints(declared)}, {_ints(dilation)});"
        )
    else:
        cpp.append(
            f"const dl::Filter<{t}> {n}_filter({n}_filter_element, {int(layer.weight.exponent)}, "
            f"{_ints(declared)}, {_ints(dilation)});"
        )
    getters.append(f"const dl::Filter<{t}> *get_{n}_filter() {{ return &{n}_filter; }}")
    if layer.bias is not None:
        bias_exponent = layer.input_exponent if layer.acc_exponent.ndim else int(layer.acc_exponent)
        hpp.append(f"const dl::Bias<{bt}> *get_{n}_bias();")
        cpp.append(_array(bt, f"{n}_bias_element", layer.bias))
        cpp.append(f"const dl::Bias<{bt}> {n}_bias({n}_bias_element, {bias_exponent}, {{{layer.bias.size}}});")
        getters.append(f"const dl::Bias<{bt}> *get_{n}_bias() {{ return &{n}_bias; }}")
    if layer.activation == "ReLU":
        hpp.append(f"const dl::Activation<{t}> *get_{n}_activation();")
        cpp.append(f"const dl::Activation<{t}> {n}_activation(dl::ReLU);")
        getters.append(f"const dl::Activation<{t}> *get_{n}_activation() {{ return &{n}_activation; }}")
    elif layer.activation == "LeakyReLU":
        alpha_q, alpha_e = layer.alpha
        hpp.append(f"const dl::Activation<{t}> *get_{n}_activation();")
        cpp.append(_array(t, f"{n}_activation_element", [alpha_q]))
        cpp.append(f"const dl::Activation<{t}> {n}_activation(dl::LeakyReLU, {n}_activation_element, {alpha_e}, {{1}});")
        getters.append(f"const dl::Activation<{t}> *get_{n}_activation() {{ return &{n}_activation; }}")
    cpp.append("")


def report_text(graph: QdqGraph, name: str, files: list[str]) -> str:
    """A short Markdown summary of what was exported and what to watch."""
    spec = graph.spec
    layers = list(graph.layers().values())
    acc_max = (1 << (spec.bias_bits - 1)) - 1
    lines = [
        f"# ESP-DL export of '{name}' for {spec.chip}",
        "",
        f"- int{spec.bits} features and weights, symmetric, power-of-two exponents (real = int * 2^exponent)",
        f"- rounding {spec.rounding}; biases {spec.bias_bits}-bit ({spec.bias_ctype}) at the accumulator's exponent",
        f"- filter element order: {'blocks of %d output channels (N%dHWC%d), remainder NHWC' % (spec.align, spec.align, spec.align) if spec.blocked_filters else 'NHWC (depthwise HWCN)'}",
        f"- files: {', '.join(files)}",
        "",
        "| layer | op | activation | input exp | weight exp | output exp | bias clipped | worst-case accumulator bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    warnings = []
    for layer in layers:
        w = layer_filter(layer)
        k = int(np.prod(w.shape[1:]))
        qmax_in = 1 << (spec.bits - 1)
        worst = k * qmax_in * int(np.abs(w).max(initial=0)) + (int(np.abs(layer.bias).max(initial=0)) if layer.bias is not None else 0)
        bits = max(worst, 1).bit_length() + 1
        wexp = layer.weight.exponent
        wexp_text = str(int(wexp)) if wexp.ndim == 0 else f"{int(wexp.min())}..{int(wexp.max())} per channel"
        lines.append(
            f"| {layer.name} | {layer.kernel.op_type} | {layer.activation} | {layer.input_exponent} | {wexp_text} | "
            f"{layer.output_exponent} | {layer.bias_clipped} | {bits}{' (over ' + str(spec.bias_bits) + ')' if worst > acc_max else ''} |"
        )
        if layer.bias_clipped:
            warnings.append(f"{layer.name}: {layer.bias_clipped} bias value(s) saturated to {spec.bias_bits} bits")
    lines.append("")
    lines.append(
        f"The worst-case column bounds |accumulator| by inputs at full scale; the accumulator is taken to be "
        f"{spec.bias_bits} bits wide. `Esp32Backend.evaluate(...)` reports the largest accumulator actually "
        "reached on real data."
    )
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"


