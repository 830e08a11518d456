"""Deterministic test models built with ``onnx.helper``, with calibration and evaluation data.

Every builder returns ``(model, calibration_feeds, evaluation_feeds)``. The feeds are dicts of stacked
arrays (``{input name: array}`` with the batch on axis 0); calibration and evaluation samples are drawn
independently, so accuracy is always measured on data the calibrator never saw. Everything is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Feeds",
    "resnet_like",
    "transformer_block",
    "opset9_conv_relu",
    "conv_relu",
    "conv_clip",
    "conv_residual_add",
    "conv_maxpool_conv",
    "conv_reshape_transpose_conv",
    "conv_concat",
    "conv_resize_conv",
    "matmul_const",
    "gemm",
    "attention_core",
    "outlier_channel_cnn",
    "run_float",
]

Feeds = dict[str, np.ndarray]
Built = tuple[onnx.ModelProto, Feeds, Feeds]

OPSET = 17
IR_VERSION = 8  # what opset 17 was released with; keeps the models loadable by older runtimes


# -- small helpers --------------------------------------------------------------------------------------------
def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto],
    name: str,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ortq-tests", ir_version=ir_version
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _image_input(name: str = "input", channels: int = 3, size: int = 32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, size, size])


def _conv_weight(rng: np.random.Generator, c_out: int, c_in: int, k: int, gain: float = 1.0) -> np.ndarray:
    """He-initialised, with a per-output-channel spread like a BatchNorm folded into the conv."""
    fan_in = c_in * k * k
    w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(c_out, c_in, k, k))
    channel_gain = np.exp(rng.normal(0.0, 0.15, size=(c_out, 1, 1, 1)))
    return (gain * w * channel_gain).astype(np.float32)


def _bias(rng: np.random.Generator, n: int, scale: float = 0.05) -> np.ndarray:
    return rng.normal(0.0, scale, size=n).astype(np.float32)


def smooth_images(rng: np.random.Generator, n: int, channels: int = 3, size: int = 32, base: int = 4) -> np.ndarray:
    """Smooth random images: low-resolution noise upsampled bilinearly, plus a little pixel noise."""
    coarse = rng.normal(0.0, 1.0, size=(n, channels, base + 1, base + 1))
    grid = np.linspace(0.0, base, size)
    i0 = np.minimum(grid.astype(int), base - 1)
    t = (grid - i0)[None, None]
    rows = coarse[:, :, i0, :] * (1 - t[..., None]) + coarse[:, :, i0 + 1, :] * t[..., None]
    img = rows[:, :, :, i0] * (1 - t[:, :, None, :]) + rows[:, :, :, i0 + 1] * t[:, :, None, :]
    img += rng.normal(0.0, 0.05, size=img.shape)
    return img.astype(np.float32)


def run_float(model: onnx.ModelProto, feeds: Feeds, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``model`` with ONNX Runtime on the CPU (no graph optimizations that could change the numbers)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


# -- a ResNet-style CNN ---------------------------------------------------------------------------------------
class _Net:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(_init(name, value))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str | list[str]:
        name = self.name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1, gain: float = 1.0) -> str:
        w = self.const("w", _conv_weight(self.rng, c_out, c_in, k, gain))
        b = self.const("b", _bias(self.rng, c_out))
        pad = k // 2
        return self.node("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])


def _resnet_body(net: _Net, x: str) -> str:
    """Stem, MaxPool, an identity block, a stride-2 projection block, an identity block, GAP, Flatten."""
    h = net.relu(net.conv(x, 3, 16))  # 32x32
    h = net.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])  # 16x16
    # identity block; the second conv of a residual branch is scaled down, as trained nets (and
    # zero-init-residual schemes) do, so activations stay O(1) through the additions
    r = net.relu(net.conv(h, 16, 16))
    r = net.conv(r, 16, 16, gain=0.5)
    h = net.relu(net.node("Add", [h, r]))
    # projection block, stride 2 -> 8x8
    r = net.relu(net.conv(h, 16, 32, stride=2))
    r = net.conv(r, 32, 32, gain=0.5)
    p = net.conv(h, 16, 32, k=1, stride=2)
    h = net.relu(net.node("Add", [p, r]))
    # identity block at 8x8
    r = net.relu(net.conv(h, 32, 32))
    r = net.conv(r, 32, 32, gain=0.5)
    h = net.relu(net.node("Add", [h, r]))
    h = net.node("GlobalAveragePool", [h])
    return net.node("Flatten", [h], axis=1)


def _gratings(rng: np.random.Generator, n: int, size: int = 32, amplitude: float = 1.5) -> np.ndarray:
    """One oriented colour grating per class: random 3x3 filters respond to them quite differently."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, 3, size, size))
    for k in range(n):
        theta = np.pi * k / n
        freq = 2 * np.pi * rng.uniform(0.08, 0.3)
        wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 2 * np.pi))
        color = rng.normal(0.0, 1.0, size=3)
        out[k] = amplitude * color[:, None, None] * wave[None] / np.linalg.norm(color)
    return out.astype(np.float32)


def _class_images(rng: np.random.Generator, prototypes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of the prototypes' classes: a prototype at a random contrast plus a smooth random image."""
    labels = rng.integers(0, len(prototypes), size=n)
    contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
    images = contrast * prototypes[labels] + 0.6 * smooth_images(rng, n)
    return images.astype(np.float32), labels


def resnet_like(seed: int = 0, n_calibration: int = 64, n_evaluation: int = 64) -> Built:
    """A small ResNet-style classifier, input ``input`` [N, 3, 32, 32] (dynamic batch), output ``logits`` [N, 10].

    The convolutions are random (He init, with a per-output-channel spread as folded BatchNorms give);
    the data are 10 classes of colour gratings under smooth noise. The Gemm head is a nearest-class-mean
    classifier fitted on the float features of 320 separate training images, so predictions spread over
    the classes with realistic margins and top-1 agreement means something. (A random head predicts one
    or two classes for every input: top-1 agreement would be trivially 1.0 and the logits' SQNR inflated
    by their constant part. With a balanced head on non-discriminative random features, 8-bit min-max
    PTQ, ortq's and ONNX Runtime's alike, lands at 23-28 dB.)
    """
    rng = np.random.default_rng(seed)
    net = _Net(rng)
    features = _resnet_body(net, "input")
    n_features, n_classes = 32, 10

    body = _model(
        list(net.nodes), [_image_input()],
        [helper.make_tensor_value_info(features, TensorProto.FLOAT, ["N", n_features])],
        list(net.inits), "resnet_like_body",
    )
    prototypes = _gratings(rng, n_classes)
    train, train_labels = _class_images(rng, prototypes, 320)
    (feat,) = run_float(body, {"input": train})
    # Nearest class mean in a (regularised) whitened feature space: logits_k = z . c_k - |c_k|^2 / 2, the
    # per-sample constant -|z|^2 / 2 dropped, centred over the classes.
    mu = feat.mean(0)
    std = feat.std(0) + feat.std(0).mean()  # the regulariser keeps near-constant features from dominating
    z = (feat - mu) / std
    c = np.stack([z[train_labels == k].mean(0) for k in range(n_classes)])
    w_z = c - c.mean(0)
    b_z = -0.5 * (c**2).sum(1)
    b_z -= b_z.mean()
    sharpness = 4.0
    weight = (sharpness * w_z / std).astype(np.float32)  # [10, 32], used with transB=1
    bias = (sharpness * (b_z - (w_z * (mu / std)).sum(1))).astype(np.float32)
    w = net.const("fc_w", weight)
    b = net.const("fc_b", bias)
    net.nodes.append(helper.make_node("Gemm", [features, w, b], ["logits"], name="fc", transB=1))

    model = _model(
        net.nodes, [_image_input()], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
        net.inits, "resnet_like",
    )
    calib, _ = _class_images(rng, prototypes, n_calibration)
    evaluation, _ = _class_images(rng, prototypes, n_evaluation)
    return model, {"input": calib}, {"input": evaluation}


def outlier_channel_cnn(seed: int = 0, outlier: float = 1000.0, n: int = 32) -> Built:
    """Five Conv+Relu layers and a Gemm head; layer 3 is quantization-hostile on purpose.

    Output channel 0 of ``conv_3`` is ``outlier`` times larger than the others and ``conv_4`` divides its
    input channel 0 by the same factor, so the float model is ordinary while a per-tensor activation scale on
    ``conv_3``'s output leaves the other seven channels almost no levels. Tools that rank quantization
    damage must point at that tensor (``relu_3_out``, as the Relu is fused into the Conv).
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x, c_in = "input", 3
    for i in range(1, 6):
        w = _conv_weight(rng, 8, c_in, 3)
        if i == 3:
            w[0] *= outlier
        if i == 4:
            w[:, 0] /= outlier
        inits += [_init(f"w_{i}", w), _init(f"b_{i}", _bias(rng, 8))]
        nodes += [
            helper.make_node("Conv", [x, f"w_{i}", f"b_{i}"], [f"conv_{i}_out"], name=f"conv_{i}", pads=[1] * 4),
            helper.make_node("Relu", [f"conv_{i}_out"], [f"relu_{i}_out"], name=f"relu_{i}"),
        ]
        x, c_in = f"relu_{i}_out", 8
    inits += [_init("fc_w", (rng.standard_normal((10, 8)) * 0.5).astype(np.float32)), _init("fc_b", _bias(rng, 10))]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    model = _model(
        nodes, [_image_input(size=16)], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits, "outlier_channel_cnn",
    )
    return model, {"input": smooth_images(rng, n, size=16)}, {"input": smooth_images(rng, n, size=16)}


# -- a BERT-style encoder layer -------------------------------------------------------------------------------
def transformer_block(
    seed: int = 0,
    mask_value: float = -1e4,
    n_calibration: int = 64,
    n_evaluation: int = 64,
    seq: int = 16,
    dim: int = 64,
    heads: int = 4,
    ffn: int = 256,
    gelu: bool = True,
) -> Built:
    """One post-LN encoder layer (opset 17), inputs ``hidden`` [N, S, D] and ``attention_mask`` [N, S].

    The mask is 1 for tokens to keep and 0 for padding and is turned into an additive bias as
    ``(1 - mask) * mask_value`` (BERT uses -1e4; exported HF models often use the float32 minimum, -3.4e38).
    """
    rng = np.random.default_rng(seed)
    d_head = dim // heads
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(_init(name, np.asarray(value)))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(x: str, prefix: str, d_in: int, d_out: int, gain: float = 1.0) -> str:
        w = rng.normal(0.0, gain / math.sqrt(d_in), size=(d_in, d_out)).astype(np.float32)
        b = rng.normal(0.0, 0.02, size=d_out).astype(np.float32)
        y = node("MatMul", [x, const(f"{prefix}_w", w)], f"{prefix}_matmul")
        return node("Add", [y, const(f"{prefix}_b", b)], f"{prefix}_out")

    def layer_norm(x: str, prefix: str) -> str:
        gamma = (1.0 + rng.normal(0.0, 0.1, size=dim)).astype(np.float32)
        beta = rng.normal(0.0, 0.05, size=dim).astype(np.float32)
        return node(
            "LayerNormalization", [x, const(f"{prefix}_gamma", gamma), const(f"{prefix}_beta", beta)],
            f"{prefix}_out", axis=-1, epsilon=1e-5,
        )

    to_heads = const("to_heads_shape", np.array([0, 0, heads, d_head], dtype=np.int64))
    from_heads = const("from_heads_shape", np.array([0, 0, dim], dtype=np.int64))

    q = linear("hidden", "q", dim, dim)
    k = linear("hidden", "k", dim, dim)
    v = linear("hidden", "v", dim, dim)
    q = node("Transpose", [node("Reshape", [q, to_heads], "q_heads")], "q_t", perm=[0, 2, 1, 3])
    k = node("Transpose", [node("Reshape", [k, to_heads], "k_heads")], "k_t", perm=[0, 2, 3, 1])
    v = node("Transpose", [node("Reshape", [v, to_heads], "v_heads")], "v_t", perm=[0, 2, 1, 3])
    scores = node("MatMul", [q, k], "scores")
    scores = node("Div", [scores, const("sqrt_d", np.array(math.sqrt(d_head), dtype=np.float32))], "scores_scaled")
    inverted = node("Sub", [const("one", np.array(1.0, dtype=np.float32)), "attention_mask"], "mask_inverted")
    bias = node("Mul", [inverted, const("mask_value", np.array(mask_value, dtype=np.float32))], "mask_bias")
    bias = node("Unsqueeze", [bias, const("mask_axes", np.array([1, 2], dtype=np.int64))], "mask_bias_4d")
    scores = node("Add", [scores, bias], "scores_masked")
    probs = node("Softmax", [scores], "probs", axis=-1)
    context = node("MatMul", [probs, v], "context")
    context = node("Transpose", [context], "context_t", perm=[0, 2, 1, 3])
    context = node("Reshape", [context, from_heads], "context_merged")
    attn = linear(context, "attn_out", dim, dim)
    h = node("Add", ["hidden", attn], "attn_residual")
    h = layer_norm(h, "ln1")

    f = linear(h, "ffn_in", dim, ffn, gain=math.sqrt(2.0))
    if gelu:  # 0.5 * x * (1 + erf(x / sqrt(2))), as exported by PyTorch
        e = node("Div", [f, const("sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))], "gelu_div")
        e = node("Erf", [e], "gelu_erf")
        e = node("Add", [e, const("gelu_one", np.array(1.0, dtype=np.float32))], "gelu_add")
        f = node("Mul", [f, e], "gelu_mul")
        f = node("Mul", [f, const("gelu_half", np.array(0.5, dtype=np.float32))], "gelu_out")
    else:
        f = node("Relu", [f], "ffn_relu")
    f = linear(f, "ffn_out", ffn, dim, gain=0.5)
    h = node("Add", [h, f], "ffn_residual")
    nodes.append(
        helper.make_node(
            "LayerNormalization",
            [h, const("ln2_gamma", (1.0 + rng.normal(0.0, 0.1, size=dim)).astype(np.float32)),
             const("ln2_beta", rng.normal(0.0, 0.05, size=dim).astype(np.float32))],
            ["output"], name="ln2", axis=-1, epsilon=1e-5,
        )
    )
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", seq, dim]),
            helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["N", seq]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", seq, dim])],
        inits, "transformer_block",
    )

    # Token embeddings: a shared positional component, per-token noise, and one larger "outlier" feature
    # direction as real BERT activations have.
    position = rng.normal(0.0, 0.5, size=(seq, dim)).astype(np.float32)

    def feeds(n: int) -> Feeds:
        hidden = position[None] + rng.normal(0.0, 1.0, size=(n, seq, dim)).astype(np.float32)
        hidden[:, :, 3] *= 3.0
        lengths = rng.integers(seq // 2, seq + 1, size=n)
        lengths[: max(1, n // 4)] = seq  # some unpadded rows too
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.float32)
        return {"hidden": hidden.astype(np.float32), "attention_mask": mask}

    return model, feeds(n_calibration), feeds(n_evaluation)


# -- an old-opset model ---------------------------------------------------------------------------------------
def opset9_conv_relu(seed: int = 0, n: int = 16) -> Built:
    """Conv + Relu + Conv at opset 9 (IR version 4), so quantization must convert it first."""
    rng = np.random.default_rng(seed)
    w1, b1 = _conv_weight(rng, 8, 3, 3), _bias(rng, 8)
    w2, b2 = _conv_weight(rng, 4, 8, 3, gain=0.5), _bias(rng, 4)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["output"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
    ]
    model = _model(
        nodes, [_image_input(size=16)], [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)], "opset9_conv_relu",
        opset=9, ir_version=4,
    )
    return model, {"input": smooth_images(rng, n, size=16)}, {"input": smooth_images(rng, n, size=16)}


# -- tiny fusion patterns -------------------------------------------------------------------------------------
# Each is a few nodes between a graph input and a graph output, with an integer kernel on both sides of
# the op under test where that matters. Node names are stable so tests can refer to them.
def _pattern(
    build, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str, data, seed: int,
    n: int = 64,
) -> Built:
    rng = np.random.default_rng(seed)
    net = _Net(rng)
    build(net)
    model = _model(net.nodes, inputs, outputs, net.inits, name)
    return model, data(rng, n), data(rng, n)


def _images(channels: int = 3, size: int = 16):
    return lambda rng, n: {"input": smooth_images(rng, n, channels, size)}


def _conv_pattern(name: str, body, out_shape: list, seed: int, channels: int = 3, size: int = 16) -> Built:
    return _pattern(
        body, [_image_input(channels=channels, size=size)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        name, _images(channels, size), seed,
    )


def _rename_last_output(net: _Net, name: str = "output") -> None:
    net.nodes[-1].output[0] = name


def conv_relu(seed: int = 0) -> Built:
    """input -> Conv -> Relu -> Conv -> output: the first Conv must fuse with its Relu."""
    def body(net: _Net) -> None:
        h = net.relu(net.conv("input", 3, 8))
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_relu", body, ["N", 8, 16, 16], seed)


def conv_clip(seed: int = 0) -> Built:
    """input -> Conv -> Clip(0, 6) -> Conv -> output (ReLU6, min and max as constant inputs, opset 11+)."""
    def body(net: _Net) -> None:
        h = net.conv("input", 3, 8, gain=2.0)
        lo = net.const("clip_min", np.array(0.0, dtype=np.float32))
        hi = net.const("clip_max", np.array(6.0, dtype=np.float32))
        h = net.node("Clip", [h, lo, hi])
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_clip", body, ["N", 8, 16, 16], seed)


def conv_residual_add(seed: int = 0) -> Built:
    """Two Conv branches from one Relu'd stem, added, then Relu and a Conv: the Add must be QLinearAdd."""
    def body(net: _Net) -> None:
        stem = net.relu(net.conv("input", 3, 8))
        a = net.conv(stem, 8, 8)
        b = net.conv(stem, 8, 8, gain=0.5)
        h = net.relu(net.node("Add", [a, b]))
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_residual_add", body, ["N", 8, 16, 16], seed)


def conv_maxpool_conv(seed: int = 0) -> Built:
    def body(net: _Net) -> None:
        h = net.relu(net.conv("input", 3, 8))
        h = net.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_maxpool_conv", body, ["N", 8, 8, 8], seed)


def conv_reshape_transpose_conv(seed: int = 0) -> Built:
    """A ShuffleNet channel shuffle (Reshape -> Transpose -> Reshape) between two Conv+Relu."""
    def body(net: _Net) -> None:
        h = net.relu(net.conv("input", 3, 8))
        h = net.node("Reshape", [h, net.const("shape_groups", np.array([0, 2, 4, 16, 16], dtype=np.int64))])
        h = net.node("Transpose", [h], perm=[0, 2, 1, 3, 4])
        h = net.node("Reshape", [h, net.const("shape_flat", np.array([0, 8, 16, 16], dtype=np.int64))])
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_reshape_transpose_conv", body, ["N", 8, 16, 16], seed)


def conv_concat(seed: int = 0) -> Built:
    """Two Conv+Relu branches concatenated on channels, then a Conv."""
    def body(net: _Net) -> None:
        a = net.relu(net.conv("input", 3, 8))
        b = net.relu(net.conv("input", 3, 8, gain=2.0))  # a different range: Concat must requantize
        h = net.node("Concat", [a, b], axis=1)
        net.conv(h, 16, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_concat", body, ["N", 8, 16, 16], seed)


def conv_resize_conv(seed: int = 0) -> Built:
    """Conv+Relu, nearest 2x upsampling, Conv."""
    def body(net: _Net) -> None:
        h = net.relu(net.conv("input", 3, 8))
        scales = net.const("scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
        h = net.node("Resize", [h, "", scales], mode="nearest")
        net.conv(h, 8, 8, gain=0.5)
        _rename_last_output(net)
    return _conv_pattern("conv_resize_conv", body, ["N", 8, 32, 32], seed)


def _tokens(dim: int, seq: int | None = None):
    def data(rng: np.random.Generator, n: int) -> Feeds:
        shape = (n, dim) if seq is None else (n, seq, dim)
        return {"input": rng.normal(0.0, 1.0, size=shape).astype(np.float32)}
    return data


def matmul_const(seed: int = 0, seq: int = 8, d_in: int = 64, d_out: int = 32) -> Built:
    """input [N, S, K] @ constant [K, M] -> output (a 3-D activation, as in a transformer)."""
    def body(net: _Net) -> None:
        w = net.rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_in, d_out)).astype(np.float32)
        net.nodes.append(helper.make_node("MatMul", ["input", net.const("w", w)], ["output"], name="matmul"))
    return _pattern(
        body, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", seq, d_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", seq, d_out])],
        "matmul_const", _tokens(d_in, seq), seed,
    )


def matmul_bias(seed: int = 0, seq: int | None = 8, d_in: int = 64, d_out: int = 32) -> Built:
    """input [N, S, K] (or [N, K]) @ constant [K, M] + bias [M]: a Linear layer as exporters write it."""
    def body(net: _Net) -> None:
        w = net.rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_in, d_out)).astype(np.float32)
        net.nodes.append(helper.make_node("MatMul", ["input", net.const("w", w)], ["mm"], name="matmul"))
        net.nodes.append(helper.make_node("Add", ["mm", net.const("b", _bias(net.rng, d_out, 0.1))], ["output"], name="bias"))
    return _pattern(
        body, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", seq, d_in] if seq else ["N", d_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", seq, d_out] if seq else ["N", d_out])],
        "matmul_bias", _tokens(d_in, seq), seed,
    )


def gemm(seed: int = 0, d_in: int = 64, d_out: int = 32, trans_b: int = 1) -> Built:
    """input [N, K] -> Gemm(transB) with constant B and a [M] bias -> output."""
    def body(net: _Net) -> None:
        w = net.rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_out, d_in) if trans_b else (d_in, d_out))
        b = _bias(net.rng, d_out, 0.1)
        net.nodes.append(
            helper.make_node(
                "Gemm", ["input", net.const("w", w.astype(np.float32)), net.const("b", b)], ["output"],
                name="gemm", transB=trans_b,
            )
        )
    return _pattern(
        body, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", d_out])],
        "gemm", _tokens(d_in), seed,
    )


def attention_core(seed: int = 0, seq: int = 16, dim: int = 32) -> Built:
    """Q/K/V projections, scores = Q @ K^T (two activations), Softmax, probs @ V, output projection.

    Node names: ``q``, ``k``, ``v``, ``k_t``, ``scores``, ``softmax``, ``context``, ``out``.
    """
    def body(net: _Net) -> None:
        def proj(name: str, x: str) -> str:
            w = net.rng.normal(0.0, 1.0 / math.sqrt(dim), size=(dim, dim)).astype(np.float32)
            net.nodes.append(helper.make_node("MatMul", [x, net.const(f"{name}_w", w)], [name], name=name))
            return name
        q, k, v = proj("q", "input"), proj("k", "input"), proj("v", "input")
        net.nodes.append(helper.make_node("Transpose", [k], ["k_t"], name="k_t", perm=[0, 2, 1]))
        net.nodes.append(helper.make_node("MatMul", [q, "k_t"], ["scores"], name="scores"))
        net.nodes.append(helper.make_node("Softmax", ["scores"], ["softmax"], name="softmax", axis=-1))
        net.nodes.append(helper.make_node("MatMul", ["softmax", v], ["context"], name="context"))
        w = net.rng.normal(0.0, 1.0 / math.sqrt(dim), size=(dim, dim)).astype(np.float32)
        net.nodes.append(helper.make_node("MatMul", ["context", net.const("out_w", w)], ["output"], name="out"))
    return _pattern(
        body, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", seq, dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", seq, dim])],
        "attention_core", _tokens(dim, seq), seed,
    )
