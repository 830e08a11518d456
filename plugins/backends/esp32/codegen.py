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
import onnx

from ortq.core.errors import ModelError

from ortq.plugins.backends.esp32.chips import ChipSpec
from ortq.plugins.backends.esp32.qdq import Layer, QdqGraph, c_identifier

__all__ = [
    "filter_layout", "filter_unlayout", "layer_filter", "layer_pads", "model_class_name", "render", "render_model",
    "report_text", "v1_pads",
]

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


def v1_pads(onnx_pads: list[int]) -> list[int]:
    """ONNX 2-D pads [top, left, bottom, right] in ESP-DL v1.1's order [top, bottom, left, right]."""
    top, left, bottom, right = (list(onnx_pads) or [0, 0, 0, 0])
    return [top, bottom, left, right]


def layer_pads(layer: Layer, input_hw: tuple[int, int] | None = None) -> list[int]:
    """The layer's padding in v1.1's order, auto_pad resolved (SAME needs the input's height and width)."""
    a = layer.attrs
    auto = a.get("auto_pad", "NOTSET") or "NOTSET"
    if auto in ("NOTSET", "VALID"):
        return v1_pads(a.get("pads") or [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
    if input_hw is None:
        raise ModelError(f"{layer.kernel.name!r}: auto_pad={auto} needs the input's height and width")
    _, _, kh, kw = layer.weight.values.shape
    strides = list(a.get("strides") or [1, 1])
    dilations = list(a.get("dilations") or [1, 1])
    begin, end = [], []
    for size, k, st, d in zip(input_hw, (kh, kw), strides, dilations):
        total = max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return [begin[0], end[0], begin[1], end[1]]


def _geometry(layer: Layer) -> str:
    if layer.kernel.op_type != "Conv":
        k, n = layer.weight.values.shape
        return f"{layer.kernel.op_type} {k} -> {n} (a 1x1 filter)"
    _, _, kh, kw = layer.weight.values.shape
    a = layer.attrs
    kind = "DepthwiseConv2D" if layer.depthwise else "Conv2D"
    auto = a.get("auto_pad", "NOTSET")
    pads = f"auto_pad {auto}" if auto not in ("NOTSET", "") else f"pads [top, bottom, left, right] {v1_pads(a.get('pads') or [0, 0, 0, 0])}"
    return (
        f"{kind} {kh}x{kw}, stride {list(a.get('strides') or [1, 1])}, {pads}, "
        f"dilation {list(a.get('dilations') or [1, 1])}"
    )


def render(graph: QdqGraph, name: str) -> tuple[str, str]:
    """(header, source) text for the model read by ``graph``."""
    spec = graph.spec
    ns = f"{name}_coefficient"
    layers = graph.layers()
    covered = graph.covered_nodes()
    used: set[str] = {layer.name for layer in layers.values()}
    per_channel = any(layer.weight.exponent.ndim for layer in layers.values())
    hpp = [
        f"// ESP-DL v{spec.esp_dl} coefficients for model '{name}', generated by ortq (chip {spec.chip}).",
        f"// int{spec.bits} features and weights, {'per-channel' if per_channel else 'per-tensor'} weight exponents, "
        f"{_bias_rule(spec, per_channel)}, {spec.rounding}.",
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


def _bias_rule(spec: ChipSpec, per_channel: bool) -> str:
    ctype = spec.bias_format(per_channel)[0]
    if not spec.v1:
        return f"{spec.bias_bits}-bit biases ({ctype}) at the accumulator's exponent"
    if per_channel:
        return f"{ctype} biases at input + weight[c] + 4 (dl::Bias exponent -128)"
    return f"{ctype} biases at the layer's output exponent"


def _emit_layer(layer: Layer, spec: ChipSpec, hpp: list[str], cpp: list[str], getters: list[str]) -> None:
    t, bt, n = spec.ctype, layer.bias_ctype, layer.name
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
        bias_exponent = layer.bias_object_exponent
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
    acc_bits = spec.accumulator_bits
    acc_max = (1 << (acc_bits - 1)) - 1
    per_channel = any(layer.weight.exponent.ndim for layer in layers)
    lines = [
        f"# ESP-DL export of '{name}' for {spec.chip}",
        "",
        f"- int{spec.bits} features and weights, symmetric, power-of-two exponents (real = int * 2^exponent)",
        f"- ESP-DL v{spec.esp_dl}; rounding {spec.rounding}; {_bias_rule(spec, per_channel)}",
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
            f"{layer.output_exponent} | {layer.bias_clipped} | {bits}{' (over ' + str(acc_bits) + ')' if worst > acc_max else ''} |"
        )
        if layer.bias_clipped:
            warnings.append(f"{layer.name}: {layer.bias_clipped} bias value(s) saturated to {layer.bias_bits} bits")
    lines.append("")
    lines.append(
        f"The worst-case column bounds |accumulator| by inputs at full scale; the accumulator is taken to be "
        f"{acc_bits} bits wide. `Esp32Backend.evaluate(...)` reports the largest accumulator actually "
        "reached on real data."
    )
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"




# -- the model class (ESP-DL v1.1) ------------------------------------------------------------------------------
_AUTO_PAD = {"SAME_UPPER": "PADDING_SAME_END", "SAME_LOWER": "PADDING_SAME_BEGIN", "VALID": "PADDING_VALID"}
#: v1.1 layers that keep their input's exponent (they take no output exponent).
_KEEPS_EXPONENT = frozenset({"MaxPool", "GlobalMaxPool", "Relu", "LeakyRelu", "Flatten", "Reshape", "Concat"})
_V1_LAYER_HEADERS = {
    "Conv2D": "dl_layer_conv2d.hpp", "DepthwiseConv2D": "dl_layer_depthwise_conv2d.hpp",
    "FullyConnected": "dl_layer_fullyconnected.hpp", "Add2D": "dl_layer_add2d.hpp", "Mul2D": "dl_layer_mul2d.hpp",
    "GlobalAveragePool2D": "dl_layer_global_avg_pool2d.hpp", "GlobalMaxPool2D": "dl_layer_global_max_pool2d.hpp",
    "MaxPool2D": "dl_layer_max_pool2d.hpp", "AvgPool2D": "dl_layer_avg_pool2d.hpp", "Relu": "dl_layer_relu.hpp",
    "LeakyRelu": "dl_layer_leakyrelu.hpp", "Flatten": "dl_layer_flatten.hpp", "Reshape": "dl_layer_reshape.hpp",
    "Concat": "dl_layer_concat.hpp",
}


def model_class_name(name: str) -> str:
    """The generated class's name: the model name in capitals, as Espressif's tutorial names ``MNIST``."""
    return c_identifier(name.upper(), set())


def render_model(graph: QdqGraph, name: str) -> str:
    """``<name>_model.hpp``: a ``dl::layer::Model<feature_t>`` subclass that builds one ``dl::layer::*`` object
    per layer from the coefficient getters, with ``build()`` and ``call()`` (the base class's ``forward()``
    runs both), in the shape of Espressif's tutorial ``mnist_model.hpp``. Feature maps are HWC without a
    batch axis, as ESP-DL's. Raises :class:`ModelError` naming the node that v1.1 has no layer for."""
    spec = graph.spec
    if not spec.v1:
        raise ModelError(f"the C++ model class is written for ESP-DL v1.1; {spec.chip} runs ESP-DL v{spec.esp_dl}")
    t = spec.ctype
    layers = graph.layers()
    covered = graph.covered_nodes()
    used: set[str] = set()
    source: dict[str, str] = {}  # float tensor -> the C++ Tensor<T>& expression holding it
    exponent: dict[str, int] = {}
    members: list[tuple[str, str, str, list[str], bool]] = []  # (type, ident, ctor, inputs, is_concat)
    outputs = set(graph.index.graph_outputs)

    def origin(tensor: str) -> str:
        """The float tensor a DQ <- Q pair carries (or ``tensor`` itself)."""
        dq = graph.producer(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = graph.producer(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return origin(q.input[0])
        return tensor

    def read(tensor: str, node: onnx.NodeProto) -> str:
        t0 = origin(tensor)
        if t0 not in source:
            raise ModelError(f"node {node.name!r} ({node.op_type}) reads {tensor!r}, which no v1.1 layer computes")
        return t0

    def out_exponent(tensor: str, node: onnx.NodeProto) -> int:
        q = graph.output_quantizer(tensor)
        if q is None:
            raise ModelError(f"node {node.name!r} ({node.op_type}): its output {tensor!r} is not quantized")
        return int(graph.qdq_exponent(q).reshape(-1)[0])

    for vi in graph.model.graph.input:
        if vi.name in graph.index.initializers:
            continue
        if source:
            raise ModelError(f"model input {vi.name!r}: the generated model class takes one input")
        source[vi.name] = "input"
        q = graph.output_quantizer(vi.name)
        if q is None:
            raise ModelError(f"model input {vi.name!r} is not quantized")
        exponent[vi.name] = int(graph.qdq_exponent(q).reshape(-1)[0])

    def add(node: onnx.NodeProto, ltype: str, ctor: str, inputs: list[str], out: str, e: int, concat: bool = False) -> None:
        ident = c_identifier(f"l_{node.name or out}", used)
        members.append((ltype, ident, ctor, inputs, concat))
        source[out] = f"this->{ident}.get_output()"
        exponent[out] = e

    for node in graph.nodes:
        layer = layers.get(node.name)
        if layer is not None:
            x = read(layer.input_name, node)
            n = layer.name
            bt = layer.bias_ctype if layer.bias is not None else t
            bias = f"get_{n}_bias()" if layer.bias is not None else "NULL"
            act = f"get_{n}_activation()" if layer.activation in ("ReLU", "LeakyReLU") else "NULL"
            e = layer.output_exponent
            if e is None:
                raise ModelError(f"node {node.name!r} ({node.op_type}): its output is not quantized")
            if node.op_type == "Conv":
                kind = "DepthwiseConv2D" if layer.depthwise else "Conv2D"
                a = layer.attrs
                auto = a.get("auto_pad", "NOTSET") or "NOTSET"
                sy, sx = list(a.get("strides") or [1, 1])
                if auto == "NOTSET":
                    padding = f"PADDING_NOT_SET, {_ints(layer_pads(layer))}"
                else:
                    padding = f"{_AUTO_PAD[auto]}, {{}}"
                ctor = f"{kind}<{t}, {bt}>({e}, get_{n}_filter(), {bias}, {act}, {padding}, {sy}, {sx}, \"{node.name}\")"
                ltype = f"{kind}<{t}, {bt}>"
            else:
                _check_flatten_order(graph, layer.input_name, node)
                ctor = f"FullyConnected<{t}, {bt}>({e}, get_{n}_filter(), {bias}, {act}, true, \"{node.name}\")"
                ltype = f"FullyConnected<{t}, {bt}>"
            add(node, ltype, ctor, [x], layer.output, e)
            continue
        if node.name in covered or node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        op = node.op_type
        out = node.output[0]
        label = f"node {node.name!r} ({op})"
        if op in _KEEPS_EXPONENT:
            ins = [read(i, node) for i in (node.input if op == "Concat" else node.input[:1])]
            e_in = {exponent[i] for i in ins}
            q = graph.output_quantizer(out)
            e = int(graph.qdq_exponent(q).reshape(-1)[0]) if q is not None else None
            if len(e_in) != 1 or (e is not None and e not in e_in):
                raise ModelError(
                    f"{label}: ESP-DL v1.1's layer keeps its input's exponent, but the quantized model moves it "
                    f"({sorted(e_in)} -> {e})"
                )
            e = e_in.pop()
            if op == "MaxPool":
                kh, kw, padding, sy, sx = _pool_geometry(graph, node)
                add(node, f"MaxPool2D<{t}>", f"MaxPool2D<{t}>({{{kh}, {kw}}}, {padding}, {sy}, {sx}, \"{node.name}\")", ins, out, e)
            elif op == "GlobalMaxPool":
                add(node, f"GlobalMaxPool2D<{t}>", f"GlobalMaxPool2D<{t}>(\"{node.name}\")", ins, out, e)
            elif op == "Relu":
                add(node, f"Relu<{t}>", f"Relu<{t}>(\"{node.name}\")", ins, out, e)
            elif op == "LeakyRelu":
                from ortq.plugins.backends.esp32.qdq import quantize_alpha

                alpha_q, alpha_e = quantize_alpha(float(graph.index.attribute(node, "alpha", 0.01)), spec)
                add(node, f"LeakyRelu<{t}>", f"LeakyRelu<{t}>({alpha_q}, {alpha_e}, \"{node.name}\")", ins, out, e)
            elif op == "Flatten":
                _check_flatten_order(graph, out, node)
                add(node, f"Flatten<{t}>", f"Flatten<{t}>(\"{node.name}\")", ins, out, e)
            elif op == "Reshape":
                shape = _v1_shape(graph, node)
                _check_flatten_order(graph, out, node)
                add(node, f"Reshape<{t}>", f"Reshape<{t}>({_ints(shape)}, \"{node.name}\")", ins, out, e)
            else:  # Concat
                axis = int(graph.index.attribute(node, "axis", 1))
                rank = len(graph.index.shape(out) or [0, 0, 0, 0])
                if axis % rank != 1 or rank != 4:
                    raise ModelError(f"{label}: only channel concatenation of 4-D feature maps maps to v1.1's Concat")
                add(node, f"Concat<{t}>", f"Concat<{t}>(-1, \"{node.name}\")", ins, out, e, concat=True)
            continue
        if op in ("Add", "Mul"):
            ins = [read(i, node) for i in node.input]
            kind = "Add2D" if op == "Add" else "Mul2D"
            add(node, f"{kind}<{t}>", f"{kind}<{t}>({out_exponent(out, node)}, NULL, \"{node.name}\")", ins, out, out_exponent(out, node))
        elif op == "GlobalAveragePool":
            e = out_exponent(out, node)
            add(node, f"GlobalAveragePool2D<{t}>", f"GlobalAveragePool2D<{t}>({e}, \"{node.name}\")", [read(node.input[0], node)], out, e)
        elif op == "AveragePool":
            e = out_exponent(out, node)
            kh, kw, padding, sy, sx = _pool_geometry(graph, node)
            add(node, f"AvgPool2D<{t}>", f"AvgPool2D<{t}>({e}, {{{kh}, {kw}}}, {padding}, {sy}, {sx}, \"{node.name}\")",
                [read(node.input[0], node)], out, e)
        elif op == "Clip":
            raise ModelError(
                f"{label} cannot run on ESP-DL v1.1: v1.1 has no Clip or ReLU6 layer, and only a Clip right after a "
                "Conv/Gemm folds into its activation; use ReLU, or the ESP-DL v3 export (--format espdl)"
            )
        else:
            raise ModelError(f"{label}: ESP-DL v1.1 has no layer for it")

    ordered = [origin(o) for o in graph.index.graph_outputs]
    if len(ordered) != 1 or ordered[0] not in source or source[ordered[0]] == "input":
        raise ModelError("the generated model class needs one model output computed by a layer")
    last_use: dict[str, int] = {}
    for i, (_, _, _, inputs, _) in enumerate(members):
        for x in inputs:
            last_use[x] = i
    cls = model_class_name(name)
    headers = sorted({_V1_LAYER_HEADERS[m[0].split("<")[0]] for m in members})
    lines = [
        f"// ESP-DL v1.1 model class for '{name}', generated by ortq (chip {spec.chip}, int{spec.bits}).",
        "// Feature maps are HWC without a batch axis; forward(input) (dl::layer::Model) runs build() then call().",
        "#pragma once",
        "",
        "#include <stdint.h>",
        "#include <vector>",
        "",
        '#include "dl_layer_model.hpp"',
        *[f'#include "{h}"' for h in headers],
        f'#include "{name}_coefficient.hpp"',
        "",
        "using namespace dl;",
        "using namespace layer;",
        f"using namespace {name}_coefficient;",
        "",
        f"class {cls} : public Model<{t}>",
        "{",
        "public:",
        "    // Layers in graph order; the last one holds the model's output (get_output()).",
    ]
    for ltype, ident, _, _, _ in members:
        lines.append(f"    {ltype} {ident};")
    inits = [f"{ident}({ctor})" for _, ident, ctor, _, _ in members]
    lines += ["", f"    {cls}() : " + ",\n        ".join(inits), "    {", "    }", ""]

    def args(inputs: list[str], concat: bool) -> str:
        exprs = [source[x] for x in inputs]
        if concat:
            return "std::vector<Tensor<" + t + "> *>{" + ", ".join(f"&{e}" for e in exprs) + "}"
        return ", ".join(exprs)

    lines += [f"    void build(Tensor<{t}> &input)", "    {"]
    for _, ident, _, inputs, concat in members:
        lines.append(f"        this->{ident}.build({args(inputs, concat)});")
    lines += ["    }", "", f"    void call(Tensor<{t}> &input)", "    {"]
    for i, (_, ident, _, inputs, concat) in enumerate(members):
        lines.append(f"        this->{ident}.call({args(inputs, concat)});")
        for x in dict.fromkeys(inputs):
            if last_use[x] == i and x not in outputs:
                lines.append(f"        {source[x]}.free_element();")
    lines += ["    }", "};", ""]
    return "\n".join(lines)


def _pool_geometry(graph: QdqGraph, node: onnx.NodeProto) -> tuple[int, int, str, int, int]:
    kh, kw = (int(v) for v in graph.index.attribute(node, "kernel_shape"))
    sy, sx = (int(v) for v in (graph.index.attribute(node, "strides") or [1, 1]))
    auto = graph.index.attribute(node, "auto_pad", "NOTSET")
    auto = (auto.decode() if isinstance(auto, bytes) else auto) or "NOTSET"
    if auto != "NOTSET":
        return kh, kw, f"{_AUTO_PAD[auto]}, {{}}", sy, sx
    pads = [int(v) for v in (graph.index.attribute(node, "pads") or [0, 0, 0, 0])]
    return kh, kw, f"PADDING_NOT_SET, {_ints(v1_pads(pads))}", sy, sx


def _v1_shape(graph: QdqGraph, node: onnx.NodeProto) -> list[int]:
    """A Reshape's target without the batch axis, as ESP-DL's HWC shape ([1, 1, K] for a vector)."""
    target = graph.index.constant_value(node.input[1])
    rest = [int(d) for d in np.asarray(target).reshape(-1)[1:]]
    if len(rest) == 1 and rest[0] > 0:
        return [1, 1, rest[0]]
    if len(rest) == 1:
        shape = graph.index.shape(node.input[0])
        if shape and all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return [1, 1, int(np.prod(shape[1:]))]
    if len(rest) == 3 and all(d > 0 for d in rest):
        c, h, w = rest
        if c == 1 or h * w == 1:  # the same element order in C, H, W and H, W, C
            return [h, w, c]
    raise ModelError(f"Reshape {node.name!r}: target shape {list(np.asarray(target))} has no ESP-DL v1.1 equivalent here")


def _check_flatten_order(graph: QdqGraph, tensor: str, node: onnx.NodeProto) -> None:
    """Refuse flattening a [C, H, W] map with H*W > 1 and C > 1: ONNX orders it C, H, W, ESP-DL H, W, C, so the
    next layer's filter would need its rows permuted, which this export does not do."""
    src = graph.producer(tensor)
    while src is not None and src.op_type in ("QuantizeLinear", "DequantizeLinear"):
        src = graph.producer(src.input[0])
    if src is None or src.op_type not in ("Flatten", "Reshape"):
        return
    shape = graph.index.shape(src.input[0])
    if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
        _, c, h, w = shape
        if c > 1 and h * w > 1:
            raise ModelError(
                f"node {node.name!r} ({node.op_type}) reads {src.op_type} {src.name!r} of a [{c}, {h}, {w}] map: "
                "ONNX flattens C, H, W while ESP-DL feature maps are H, W, C; the generated model would need a "
                "permuted filter (pool to 1x1 first, e.g. GlobalAveragePool)"
            )
