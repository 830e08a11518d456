"""Property-based fuzzing: random valid ONNX graphs either quantize into a valid, accurate model or fail cleanly.

A generated case is a random chain of the supported ops (Conv with random kernel/stride/pad/dilation/group,
activations, Add/Mul against another branch or a constant, Concat, pools, Resize, Pad, data movement,
Split, a Gemm/MatMul head, Softmax) over random shapes, with random weights (normal, all zero, tiny 1e-4,
large 1e2) and random input data (scales 1e-3 to 1e2, sometimes one channel constant). The property:

- ``Toolkit.quantize`` either returns a model that passes ``onnx.checker`` (full check), runs in ONNX Runtime
  and keeps every output's SQNR vs the float model above :data:`SQNR_FLOOR_DB` on the calibration data;
- or raises an :class:`ortq.OrtqError` (never any other exception) with a one-line message. Errors that
  can only be ortq's fault on a valid float model (:class:`ortq.VerificationError`: the rewrite produced
  an invalid model; :class:`ortq.CalibrationError`: the observed model did not run) fail the property too.

**The SQNR floor, 15 dB.** It is the pipeline's own "may be unusable" warning threshold
(``ortq.pipeline.verify.LOW_SQNR_DB``). One 8-bit requantization of a Gaussian-ish tensor with min/max ranges costs
about 30-40 dB; a chain of up to eight ops requantizes several times and multiplies the errors (Mul of
two quantized branches, Concat sharing one scale between a tiny and a large branch), which in practice
brings the worst generated cases into the 20s. Measuring on the calibration data itself means no value
ever falls outside its calibrated range, so a case below 15 dB is a real defect, not bad luck in sampling.
Cases where no 8-bit quantizer can reach the floor are skipped with ``assume`` (and counted by
``benchmarks/fuzz_long.py``): a (nearly) constant float output, where SQNR measures nothing; a Sigmoid or
Softmax fed values spread wider than :data:`SATURATION_STD` (a step function / arg-max of large logits,
whose output flips wherever a quantization error crosses the threshold); and a Clip or Relu keeping less
than :data:`MIN_CLIP_FRACTION` of its input's range (the producer's 8-bit min/max scale leaves the kept part
a handful of levels; ONNX Runtime's quantizer behaves the same; a LeakyRelu counts alpha times the negative
part as kept), and for the same reason a Split or Slice
keeping a part whose range is less than that fraction of its input's (a constant input channel at -3 beside
channels reaching ±300: one per-tensor scale, static or dynamic, rounds the kept channel to a few steps);
and, most generally, a model whose output already falls below the floor when a single tensor alone, the input
or any intermediate one, is rounded to 8 bits with its own min/max scale (:func:`_rounding_sqnr`: a depthwise
Conv carrying a constant channel of 1.0 from a ±280 input to a Softmax gives 6 dB with ortq's dynamic mode and
5.8 dB with ONNX Runtime's quantize_dynamic; a MaxPool keeping the top 1% of a Conv's range). That criterion
separates 8-bit limits from ortq's defects: the Conv whose output is its bias (an expected failure below)
loses nothing when any one tensor is rounded, and 0 dB when quantized.

CI runs 25 derandomized examples in static mode and 20 in dynamic mode (``Toolkit.quantize_dynamic``, same
floor, same skips; see :data:`DYNAMIC_SQNR_FLOOR_DB`); ``benchmarks/fuzz_long.py`` runs both properties with
500 examples or more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db
from ortq.pipeline.run import QuantizationResult

SQNR_FLOOR_DB = 15.0
OPSET = 13
SAMPLES = 8

#: Errors that on a valid float model can only be ortq's own fault.
BUG_ERRORS = (ortq.VerificationError, ortq.CalibrationError)

CI_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

#: Dynamic mode has no calibration pass: its examples are cheaper, and fewer are needed on top of static's.
DYNAMIC_CI_SETTINGS = settings(CI_SETTINGS, max_examples=20)


@dataclass
class Case:
    """A generated model, its calibration data, and options, with a description for failure messages."""

    model: onnx.ModelProto
    data: dict[str, np.ndarray]
    options: dict = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Case({' -> '.join(self.steps)}; options={self.options})"


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.k = 0
        self.steps: list[str] = []

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def i64(self, values: list[int]) -> str:
        return self.const(np.array(values, np.int64), "i")

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_"), **attrs))
        return outs


def _weights(draw, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    kind = draw(st.sampled_from(["normal", "normal", "normal", "normal", "zero", "tiny", "large"]))
    seed = draw(st.integers(0, 2**16))
    w = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(max(fan_in, 1))
    if kind == "zero":
        w = np.zeros(shape)
    elif kind == "tiny":
        w = w * 1e-4
    elif kind == "large":
        w = w * 1e2
    return w.astype(np.float32)


@st.composite
def cases(draw) -> Case:
    b = _Builder()
    c = draw(st.integers(1, 4))
    h = draw(st.integers(3, 10))
    w = draw(st.integers(3, 10))
    shape = [c, h, w]  # the current 4-D tensor, without the batch axis
    cur = "x"
    branches: list[tuple[str, list[int]]] = [(cur, list(shape))]
    n_ops = draw(st.integers(1, 7))
    for _ in range(n_ops):
        c, h, w = shape
        op = draw(st.sampled_from([
            "Conv", "Conv", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Add", "Mul", "Concat", "MaxPool",
            "AveragePool", "Resize", "Pad", "Transpose", "Slice", "Split", "Reshape", "UnsqueezeSqueeze",
        ]))
        if op == "Conv":
            groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            out_c = groups * draw(st.integers(1, 3))
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            dil = draw(st.integers(1, 2))
            pad = draw(st.integers(0, k - 1)) if k > 1 else 0
            oh = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
            ow = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
            if oh < 1 or ow < 1:
                continue
            wt = b.const(_weights(draw, (out_c, c // groups, k, k), c // groups * k * k), "w")
            ins = [cur, wt]
            if draw(st.booleans()):
                ins.append(b.const(_weights(draw, (out_c,), 1) * 0.1, "b"))
            cur = b.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], dilations=[dil, dil],
                         pads=[pad] * 4, group=groups)[0]
            shape = [out_c, oh, ow]
            b.steps.append(f"Conv(k{k},s{stride},p{pad},d{dil},g{groups},{c}->{out_c})")
        elif op == "Relu":
            cur = b.node("Relu", [cur])[0]
            b.steps.append("Relu")
        elif op == "Clip":
            lo = draw(st.sampled_from([0.0, -1.0, -0.25]))
            hi = draw(st.sampled_from([6.0, 1.0, 0.5]))
            cur = b.node("Clip", [cur, b.const(np.float32(lo)), b.const(np.float32(hi))])[0]
            b.steps.append(f"Clip({lo},{hi})")
        elif op == "LeakyRelu":
            cur = b.node("LeakyRelu", [cur], alpha=draw(st.sampled_from([0.01, 0.1, 0.3])))[0]
            b.steps.append("LeakyRelu")
        elif op == "Sigmoid":
            cur = b.node("Sigmoid", [cur])[0]
            b.steps.append("Sigmoid")
        elif op in ("Add", "Mul"):
            same = [t for t, s in branches if s == shape and t != cur]
            if same and draw(st.booleans()):
                other = draw(st.sampled_from(same))
                b.steps.append(f"{op}(branch)")
            else:
                cshape = draw(st.sampled_from([(c, 1, 1), (1,), (c, h, w), ()]))
                seed = draw(st.integers(0, 2**16))
                mag = draw(st.sampled_from([0.5, 1.0, 1e-3, 10.0]))
                value = np.random.default_rng(seed).standard_normal(cshape) * mag
                if op == "Mul":
                    value = value + np.sign(value) * mag  # keep multipliers away from zero
                other = b.const(value.astype(np.float32))
                b.steps.append(f"{op}(const {cshape}, x{mag})")
            ins = [cur, other] if draw(st.booleans()) else [other, cur]
            cur = b.node(op, ins)[0]
        elif op == "Concat":
            same = [(t, s) for t, s in branches if s[1:] == shape[1:]]
            other, oshape = draw(st.sampled_from(same))
            cur = b.node("Concat", [cur, other], axis=1)[0]
            shape = [c + oshape[0], h, w]
            b.steps.append("Concat")
        elif op in ("MaxPool", "AveragePool"):
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            pad = draw(st.integers(0, k // 2))
            oh = (h + 2 * pad - k) // stride + 1
            ow = (w + 2 * pad - k) // stride + 1
            if oh < 1 or ow < 1:
                continue
            cur = b.node(op, [cur], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)[0]
            shape = [c, oh, ow]
            b.steps.append(f"{op}(k{k},s{stride},p{pad})")
        elif op == "Resize":
            if h * w > 64:
                continue
            scales = b.const(np.array([1, 1, 2, 2], np.float32))
            cur = b.node("Resize", [cur, "", scales], mode="nearest")[0]
            shape = [c, 2 * h, 2 * w]
            b.steps.append("Resize")
        elif op == "Pad":
            mode = draw(st.sampled_from(["constant", "reflect", "edge"]))
            p = draw(st.integers(0, 1 if mode == "reflect" and min(h, w) < 3 else 2))
            if mode == "reflect" and p >= min(h, w):
                p = 0
            cur = b.node("Pad", [cur, b.i64([0, 0, p, p, 0, 0, p, p])], mode=mode)[0]
            shape = [c, h + 2 * p, w + 2 * p]
            b.steps.append(f"Pad({mode},{p})")
        elif op == "Transpose":
            cur = b.node("Transpose", [cur], perm=[0, 1, 3, 2])[0]
            shape = [c, w, h]
            b.steps.append("Transpose")
        elif op == "Slice":
            axis = draw(st.sampled_from([2, 3]))
            size = shape[axis - 1]
            if size < 2:
                continue
            start = draw(st.integers(0, size - 2))
            end = draw(st.integers(start + 1, size))
            cur = b.node("Slice", [cur, b.i64([start]), b.i64([end]), b.i64([axis])])[0]
            shape[axis - 1] = end - start
            b.steps.append(f"Slice(axis{axis},{start}:{end})")
        elif op == "Split":
            axis = draw(st.sampled_from([1, 2]))
            size = shape[axis - 1]
            if size < 2:
                continue
            first = draw(st.integers(1, size - 1))
            parts = b.node("Split", [cur, b.i64([first, size - first])], n_out=2, axis=axis)
            keep = draw(st.integers(0, 1))
            cur = parts[keep]
            shape[axis - 1] = first if keep == 0 else size - first
            b.steps.append(f"Split(axis{axis},{first}/{size - first}, keep {keep})")
        elif op == "Reshape":
            r = b.node("Reshape", [cur, b.i64([0, c, h * w, 1])])[0]
            cur = b.node("Reshape", [r, b.i64([0, c, h, w])])[0]
            b.steps.append("Reshape x2")
        elif op == "UnsqueezeSqueeze":
            u = b.node("Unsqueeze", [cur, b.i64([2])])[0]
            cur = b.node("Squeeze", [u, b.i64([2])])[0]
            b.steps.append("Unsqueeze/Squeeze")
        branches.append((cur, list(shape)))

    c, h, w = shape
    head = draw(st.sampled_from(["none", "gap_gemm", "flatten_gemm", "flatten_matmul", "gap_gemm_softmax"]))
    out_shape: list = ["N", c, h, w]
    if head != "none":
        if head.startswith("gap"):
            cur = b.node("GlobalAveragePool", [cur])[0]
            features = c
            b.steps.append("GlobalAveragePool")
        else:
            features = c * h * w
        cur = b.node("Flatten", [cur])[0]
        n_out = draw(st.integers(2, 6))
        if "gemm" in head:
            trans_b = draw(st.integers(0, 1))
            wshape = (n_out, features) if trans_b else (features, n_out)
            ins = [cur, b.const(_weights(draw, wshape, features), "fc")]
            if draw(st.booleans()):
                ins.append(b.const(_weights(draw, (n_out,), 1) * 0.1, "fcb"))
            cur = b.node("Gemm", ins, transB=trans_b)[0]
            b.steps.append(f"Gemm(transB={trans_b},{features}->{n_out})")
        else:
            cur = b.node("MatMul", [cur, b.const(_weights(draw, (features, n_out), features), "mm")])[0]
            b.steps.append(f"MatMul({features}->{n_out})")
        if head.endswith("softmax"):
            cur = b.node("Softmax", [cur], axis=1)[0]
            b.steps.append("Softmax")
        out_shape = ["N", n_out]

    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *branches[0][1]])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, out_shape)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=7)

    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e2]))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((SAMPLES, *branches[0][1])) * scale
    if branches[0][1][0] > 1 and draw(st.booleans()):
        ch = draw(st.integers(0, branches[0][1][0] - 1))
        x[:, ch] = draw(st.sampled_from([0.0, 1.0, -3.0]))
        b.steps.insert(0, f"input channel {ch} constant")
    b.steps.insert(0, f"x{tuple(branches[0][1])}*{scale:g}")
    options = {}
    if draw(st.booleans()):
        # Exercise the quantizers the cpu target keeps float by default.
        options["op_types_to_quantize"] = sorted({n.op_type for n in b.nodes} | {"Conv"})
    if draw(st.integers(0, 3)) == 0:
        options["per_channel"] = False
    return Case(model, {"x": x.astype(np.float32)}, options, b.steps)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


#: A Sigmoid or Softmax whose input spreads wider than this is a step function / arg-max: its quantized
#: output flips wherever quantization error crosses the threshold, whatever the quantizer does.
SATURATION_STD = 8.0
#: A Clip or Relu that keeps less than this fraction of its input's range sees fewer than 16 of the
#: producer's 256 levels (a Clip(-1, 1) after a Conv ranging over ±1400 sees three): 8-bit min/max
#: quantization of the producer cannot resolve what the clip keeps.
MIN_CLIP_FRACTION = 1 / 16


def _rounding_sqnr(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """The float model's lowest output SQNR when one tensor alone (the input or any node's output that another
    node reads) is rounded to 8 bits with its own min/max scale, zero included: what any quantizer that
    quantizes that tensor, static or dynamic, loses at the very least."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    read = {i for n in model.graph.node for i in n.input}
    tensors = ["x"] + [o for n in model.graph.node for o in n.output if o in read and o not in outputs]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t != "x")
    values = dict(zip([o.name for o in probe.graph.output], _run(probe, feed)))
    values["x"] = feed["x"]
    reference = [values[o.name] for o in model.graph.output]
    worst = float("inf")
    for tensor in tensors:
        v = values[tensor]
        if v.dtype != np.float32:
            continue
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        scale = np.float32((hi - lo) / 255 or 1.0)
        rounded = onnx.ModelProto()
        rounded.CopyFrom(model)
        for node in rounded.graph.node:
            node.input[:] = [f"{tensor}__rounded" if i == tensor else i for i in node.input]
        rounded.graph.initializer.extend([numpy_helper.from_array(scale, f"{tensor}__s"),
                                          numpy_helper.from_array(np.uint8(round(-lo / scale)), f"{tensor}__z")])
        rounded.graph.node.insert(0, helper.make_node("QuantizeLinear", [tensor, f"{tensor}__s", f"{tensor}__z"], [f"{tensor}__q"]))
        rounded.graph.node.insert(1, helper.make_node("DequantizeLinear", [f"{tensor}__q", f"{tensor}__s", f"{tensor}__z"],
                                                      [f"{tensor}__rounded"]))
        if tensor != "x":  # run it from the tensor's float value: no need to keep the graph topologically sorted
            rounded.graph.input.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
            producer = next(n for n in rounded.graph.node if tensor in n.output)
            producer.output[:] = [f"{o}__unused" if o == tensor else o for o in producer.output]
        feeds = {"x": feed["x"], tensor: v} if tensor != "x" else feed
        worst = min(worst, *(sqnr_db(r, q) for r, q in zip(reference, _run(rounded, feeds))))
    return worst


def _ill_conditioned(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    """True if no 8-bit quantization could keep this model's output near float (see the module docstring)."""
    if _rounding_sqnr(model, feed) < SQNR_FLOOR_DB:
        return True
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    watched = [n for n in probe.graph.node
               if n.op_type in ("Sigmoid", "Softmax", "Clip", "Relu", "LeakyRelu", "Split", "Slice")]
    if not watched:
        return False
    outputs = {o.name for o in probe.graph.output}
    read = {i for n in probe.graph.node for i in n.input} | outputs
    parts = {w.name: [o for o in w.output if o in read] for w in watched if w.op_type in ("Split", "Slice")}
    probe.graph.output.extend(
        onnx.ValueInfoProto(name=n)
        for n in dict.fromkeys([w.input[0] for w in watched] + [o for kept in parts.values() for o in kept])
        if n not in outputs
    )
    values = dict(zip([o.name for o in probe.graph.output], _run(probe, feed)))
    consts = {i.name: float(numpy_helper.to_array(i)) for i in model.graph.initializer if not i.dims}
    for node in watched:
        v = values[node.input[0]]
        if node.op_type in ("Sigmoid", "Softmax"):
            if float(np.std(v)) > SATURATION_STD:
                return True
            continue
        if node.op_type in ("Split", "Slice"):
            spread = max(float(v.max()), 0.0) - min(float(v.min()), 0.0)
            for part in parts[node.name]:
                kept = max(float(values[part].max()), 0.0) - min(float(values[part].min()), 0.0)
                if spread > 0 and kept < MIN_CLIP_FRACTION * spread:
                    return True
            continue
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        if node.op_type == "LeakyRelu":  # keeps the positive part and alpha times the negative one
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
            if hi > lo and hi - alpha * lo < MIN_CLIP_FRACTION * (hi - lo):
                return True
            continue
        c_lo = consts.get(node.input[1], -np.inf) if len(node.input) > 1 else 0.0
        c_hi = consts.get(node.input[2], np.inf) if len(node.input) > 2 else np.inf
        kept = max(min(hi, c_hi) - max(lo, c_lo), 0.0)
        if hi > lo and kept < MIN_CLIP_FRACTION * (hi - lo):
            return True
    return False


def _float_reference(case: Case) -> list[np.ndarray]:
    """The float model's outputs on the case's data; cases no 8-bit quantizer could pass are skipped (``assume``)."""
    onnx.checker.check_model(case.model, full_check=True)  # the generator's own contract
    reference = _run(case.model, case.data)
    assume(not _ill_conditioned(case.model, case.data))
    for ref in reference:
        spread = float(np.std(ref))
        # A (nearly) constant float output (zero weights, saturated sigmoid) makes SQNR meaningless.
        assume(np.all(np.isfinite(ref)) and spread > 1e-6 * max(float(np.max(np.abs(ref))), 1e-30))
    return reference


def _clean_error(exc: ortq.OrtqError) -> str:
    """A refusal is a valid outcome if it is one clear line."""
    message = str(exc)
    assert message and "\n" not in message.strip(), f"unclear error message {message!r}"
    return f"error: {type(exc).__name__}: {message}"


def _check_quantized(case: Case, original: bytes, result: QuantizationResult, reference: list[np.ndarray],
                     floor: float, describe: str, sqnrs: list[float] | None) -> str:
    """The caller's model untouched, the result valid and every output within ``floor`` dB of float."""
    assert case.model.SerializeToString() == original, "the caller's model was modified"
    onnx.checker.check_model(result.model, full_check=True)
    actual = _run(result.model, case.data)
    assert len(actual) == len(reference)
    for ref, act in zip(reference, actual):
        assert ref.shape == act.shape and act.dtype == ref.dtype
        sqnr = sqnr_db(ref, act)
        assert sqnr >= floor, f"{describe}output SQNR {sqnr:.1f} dB < {floor} dB\n{case!r}"
        if sqnrs is not None and result.plan.quantized_nodes:
            sqnrs.append(sqnr)
    return "ok" if result.plan.quantized_nodes else "ok, nothing quantized"


def check_case(case: Case, sqnrs: list[float] | None = None, quant_format: str = "qdq") -> str:
    """The property; returns "ok..." , "error: ..." (a clean OrtqError), or raises AssertionError.

    ``sqnrs``, if given, collects the output SQNRs of quantized cases (``benchmarks/fuzz_long.py`` reports them).
    ``quant_format="qoperator"`` checks the same property on the QOperator form (ONNX Runtime's integer kernels
    written into the file, nodes without one left in QDQ form).
    """
    reference = _float_reference(case)
    original = case.model.SerializeToString()
    toolkit = ortq.Toolkit(autoload=False)
    try:
        result = toolkit.quantize(case.model, None, calibration_data=case.data, quant_format=quant_format,
                                  **case.options)
    except BUG_ERRORS as exc:
        raise AssertionError(f"{type(exc).__name__} on a valid model: {exc}\n{case!r}") from exc
    except ortq.OrtqError as exc:
        return _clean_error(exc)
    describe = f"quantized: {sorted(result.plan.quantized_nodes)}, vetoes: {result.vetoes}\n"
    return _check_quantized(case, original, result, reference, SQNR_FLOOR_DB, describe, sqnrs)


#: Dynamic mode's floor. Only MatMul / Gemm (and Conv when asked for) are rewritten; each quantizes its
#: weight once (8-bit symmetric, 7-bit with reduce_range) and its input once per run over the whole batch
#: (8-bit asymmetric), so a chain of up to eight ops sees fewer requantizations than in static mode. The
#: floor is static mode's (the "may be unusable" threshold); observed minimum over 500 examples: see
#: ``benchmarks/fuzz_long.py``.
DYNAMIC_SQNR_FLOOR_DB = SQNR_FLOOR_DB

#: What ``Toolkit.quantize_dynamic`` is asked for: the default op types (MatMul, Gemm), or Conv too
#: (ConvInteger), with per-tensor/per-channel, 7-bit and unsigned weights.
dynamic_options = st.fixed_dictionaries({
    "op_types_to_quantize": st.sampled_from([None, ["Conv", "Gemm", "MatMul"], ["Conv"]]),
    "per_channel": st.booleans(),
    "reduce_range": st.sampled_from([False, False, False, True]),
    "weight_type": st.sampled_from(["int8", "int8", "int8", "uint8"]),
})


def check_dynamic_case(case: Case, options: dict, sqnrs: list[float] | None = None) -> str:
    """The property in dynamic mode; returns "ok...", "error: ..." (a clean OrtqError), or raises AssertionError.

    The calibration data serve as ``verify_data``, so ortq's own verification runs on them too.
    """
    reference = _float_reference(case)
    original = case.model.SerializeToString()
    toolkit = ortq.Toolkit(autoload=False)
    try:
        result = toolkit.quantize_dynamic(case.model, None, verify_data=case.data, **options)
    except ortq.VerificationError as exc:
        raise AssertionError(f"VerificationError on a valid model: {exc}\n{case!r}; {options}") from exc
    except ortq.OrtqError as exc:
        return _clean_error(exc)
    describe = f"dynamic {options}, quantized: {sorted(result.plan.quantized_nodes)}\n"
    outcome = _check_quantized(case, original, result, reference, DYNAMIC_SQNR_FLOOR_DB, describe, sqnrs)
    ops = {n.op_type for n in result.model.graph.node}
    if result.plan.quantized_nodes:  # the planned nodes became integer kernels
        assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger"}, ops
    return outcome


@pytest.fixture(autouse=True)
def _quiet_ortq_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ortq")


@CI_SETTINGS
@given(cases())
def test_random_graphs_quantize_or_fail_cleanly(case: Case) -> None:
    check_case(case)


@DYNAMIC_CI_SETTINGS
@given(cases(), dynamic_options)
def test_random_graphs_quantize_dynamically_or_fail_cleanly(case: Case, options: dict) -> None:
    check_dynamic_case(case, options)


@settings(CI_SETTINGS, max_examples=15)
@given(cases())
def test_random_graphs_convert_to_qoperator_or_fail_cleanly(case: Case) -> None:
    check_case(case, quant_format="qoperator")


# -- Regressions: the failing cases the 500-example runs found, reduced ------------------------------------------
def _gemm_model(nodes: list[onnx.NodeProto], x_shape: list, inits: list[TensorProto], n_out: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "regression", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantized_sqnr(model: onnx.ModelProto, data: dict[str, np.ndarray], **options) -> tuple[float, object]:
    result = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=data, **options)
    onnx.checker.check_model(result.model, full_check=True)
    return sqnr_db(_run(model, data)[0], _run(result.model, data)[0]), result


def _f32(name: str, value) -> TensorProto:  # noqa: ANN001
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def test_zero_weight_keeps_a_tiny_bias() -> None:
    """Found as MaxPool -> GlobalAveragePool -> Gemm(all-zero W, bias ~1e-6): 10 dB. The zero weight's scale
    of 1 made the int32 bias scale the input's (6e-6), rounding the bias, i.e. the whole output, away."""
    bias = [1.26e-6, -1.32e-6, 6.4e-6, 1.05e-6]
    model = _gemm_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [6],
                        [_f32("w", np.zeros((4, 6))), _f32("b", bias)], 4)
    data = {"x": (np.random.default_rng(0).standard_normal((8, 6)) * 1e-3).astype(np.float32)}
    for per_channel in (True, False):
        sqnr, result = _quantized_sqnr(model, data, per_channel=per_channel)
        assert result.plan.quantized_nodes == {"Gemm_0": "Gemm"}  # quantized, not dodged by staying float
        assert sqnr > 40, sqnr


def test_bias_leaves_room_for_the_int32_accumulation() -> None:
    """Found as ... -> Gemm(tiny W ~5e-5, bias ~7) -> Softmax with its columns swapped (-2.7 dB): widening the
    weight just enough put the int32 bias at the top of int32 and the accumulated products wrapped it."""
    rng = np.random.default_rng(1)
    model = _gemm_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [6],
                        [_f32("w", rng.standard_normal((2, 6)) * 5e-5), _f32("b", [7.161, 3.252])], 2)
    data = {"x": rng.uniform(0.0, 0.5, (8, 6)).astype(np.float32)}
    sqnr, result = _quantized_sqnr(model, data)
    assert result.plan.quantized_nodes == {"Gemm_0": "Gemm"}
    assert sqnr > 30, sqnr


def test_nearly_constant_global_average_pool_runs() -> None:
    """Found as Conv -> Mul -> GlobalAveragePool -> Gemm: the average was constant, its calibrated scale 57000x
    finer than its input's, and ONNX Runtime's QLinearGlobalAveragePool raised "parameter out of computation
    range" at run time (from inside quantize's verification, as a bare RuntimeException)."""
    rng = np.random.default_rng(2)
    pattern = rng.standard_normal((8, 1, 6, 2))
    pattern -= pattern.mean(axis=(2, 3), keepdims=True)  # every sample averages to exactly the offset
    data = {"x": (pattern + 2e-4).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    model = _gemm_model(nodes, [1, 6, 2], [_f32("cw", np.ones((1, 1, 1, 1))), _f32("w", [[0.5], [-1.5]])], 2)
    result = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=data)
    onnx.checker.check_model(result.model, full_check=True)
    assert "GlobalAveragePool_1" in result.plan.quantized_nodes
    # The mean (2e-4) is far below the input's quantization step: it is lost with the input, not the pool.
    error = np.max(np.abs(_run(model, data)[0] - _run(result.model, data)[0]))
    assert error <= 1.5 * float(result.params["c"].scale), error


def test_constant_zero_input_keeps_the_bias_exact() -> None:
    """Found as Conv(zero weights) -> Squeeze -> Gemm(W, b): 8 dB. The Gemm's input is constant zero, so its
    output is its bias, which an int32 bias at the arbitrary input scale 1 rounded to a few steps."""
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1),
    ]
    rng = np.random.default_rng(3)
    inits = [_f32("cw", np.zeros((1, 2, 1, 1))), _f32("w", rng.standard_normal((4, 4))), _f32("b", [-0.03, -0.22, 0.02, 0.09])]
    model = _gemm_model(nodes, [2, 2, 2], inits, 4)
    data = {"x": (rng.standard_normal((8, 2, 2, 2)) * 100).astype(np.float32)}
    sqnr, result = _quantized_sqnr(model, data)
    assert any(f.name == "Gemm_2" for f in result.plan.float_nodes), result.plan.float_nodes
    assert "b" in result.vetoes
    assert sqnr > 40, sqnr


def _dynamic_conv_sqnrs(model: onnx.ModelProto, data: dict[str, np.ndarray], tmp_path) -> tuple[float, float]:  # noqa: ANN001
    """Output SQNR of ortq's and ONNX Runtime's dynamic quantization of the model's Conv, on the same data."""
    from onnxruntime.quantization import quantize_dynamic

    ours = ortq.Toolkit(autoload=False).quantize_dynamic(model, None, op_types_to_quantize=["Conv"])
    onnx.save(model, tmp_path / "m.onnx")
    quantize_dynamic(tmp_path / "m.onnx", tmp_path / "ort.onnx", op_types_to_quantize=["Conv"])
    reference = _run(model, data)[0]
    return sqnr_db(reference, _run(ours.model, data)[0]), sqnr_db(reference, _run(onnx.load(tmp_path / "ort.onnx"), data)[0])


def test_split_keeping_a_sliver_is_ill_conditioned(tmp_path) -> None:  # noqa: ANN001
    """Found by the 5000-example dynamic run (12 dB): x*100 with channel 0 constant at -3 -> depthwise Conv ->
    Split keeping channel 0 -> GlobalAveragePool -> Gemm. The output depends only on a channel 1/150 of its
    tensor's range; one 8-bit scale for the whole tensor leaves it a step or two. ONNX Runtime's own
    quantize_dynamic loses exactly as much, so the property skips such cases instead of failing."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=3),
        helper.make_node("Split", ["c", "sizes"], ["kept", "dropped"], axis=1),
        helper.make_node("GlobalAveragePool", ["kept"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [_f32("w", np.array([12.9, -72.7, -20.5]).reshape(3, 1, 1, 1)), _f32("b", [0.003, -0.04, -0.1]),
             numpy_helper.from_array(np.array([1, 2], np.int64), "sizes"),
             _f32("fc", [[38.0], [-150.4], [-83.5], [85.0], [232.5], [55.1]])]
    model = _gemm_model(nodes, [3, 10, 8], inits, 6)
    x = np.clip(np.random.default_rng(4).standard_normal((8, 3, 10, 8)) * 100, -298.0, 280.0)
    x[0, 1, 0, :2] = -298.0, 280.0  # the found case's range: -3 is 1.3 steps of its 8-bit scale
    x[:, 0] = -3.0
    data = {"x": x.astype(np.float32)}
    assert _ill_conditioned(model, data)
    our_sqnr, ort_sqnr = _dynamic_conv_sqnrs(model, data, tmp_path)
    assert our_sqnr < SQNR_FLOOR_DB and abs(our_sqnr - ort_sqnr) < 0.5, (our_sqnr, ort_sqnr)


def test_output_lost_by_rounding_the_input_alone_is_ill_conditioned(tmp_path) -> None:  # noqa: ANN001
    """Found by the 5000-example dynamic run (6 dB): x*100 with channel 1 constant at 1.0 -> depthwise Conv ->
    Relu -> GlobalAveragePool -> Gemm -> Softmax. The constant channel is below half a step of the input's
    8-bit scale, so it rounds to zero and the logits lose its contribution, in ONNX Runtime's dynamic
    quantization as in ortq's: rounding the input alone already falls below the floor."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=2, strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    inits = [_f32("w", np.array([-0.0068, 1.046]).reshape(2, 1, 1, 1)), _f32("fc", [[-0.446, 0.657], [0.024, -0.506]])]
    model = _gemm_model(nodes, [2, 9, 3], inits, 2)
    x = np.clip(np.random.default_rng(5).standard_normal((8, 2, 9, 3)) * 100, -266.0, 289.0)
    x[0, 0, 0, :2] = -266.0, 289.0
    x[:, 1] = 1.0
    data = {"x": x.astype(np.float32)}
    assert _rounding_sqnr(model, data) < SQNR_FLOOR_DB and _ill_conditioned(model, data)
    our_sqnr, ort_sqnr = _dynamic_conv_sqnrs(model, data, tmp_path)
    assert our_sqnr < SQNR_FLOOR_DB and abs(our_sqnr - ort_sqnr) < 1.0, (our_sqnr, ort_sqnr)


def test_conv_whose_output_is_its_bias_keeps_the_bias() -> None:
    """Found by the 5000-example static run (0 dB): a width-1 input, a 2x2 kernel with dilation 2 and padding 1,
    so every tap in the width lands on padding and the Conv's output is its bias (|b| <= 0.1), while the int32
    bias scale is the input's (±300, from the rows the taps do not reach) times the weight's."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [_f32("w", rng.standard_normal((3, 3, 2, 2)) * 25), _f32("b", [0.034, 0.011, -0.104]),
             _f32("fc", rng.standard_normal((4, 3)))]
    model = _gemm_model(nodes, [3, 10, 1], inits, 4)
    data = {"x": (rng.standard_normal((8, 3, 10, 1)) * 100).astype(np.float32)}
    sqnr, result = _quantized_sqnr(model, data, per_channel=False)
    assert sqnr > 30, (sqnr, result.vetoes)
    assert "rounding it to its int32 step" in result.vetoes.get("b", "")  # the Conv stays float ...
    assert "Gemm" in result.plan.quantized_nodes.values()  # ... and the rest of the model does not
