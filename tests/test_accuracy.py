"""End-to-end accuracy: quantize realistic small models and compare with the float model in ONNX Runtime.

All numbers are measured on evaluation samples the calibrator never saw. Run with ``pytest -s`` to see them.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ortq
from ortq.core.error_measures import cosine_similarity, max_abs_error, sqnr_db, top1_agreement

if __package__:
    from tests.models import opset9_conv_relu, resnet_like, run_float, transformer_block
else:
    from models import opset9_conv_relu, resnet_like, run_float, transformer_block

CNN_MIN_SQNR_DB = 30.0
CNN_MIN_TOP1 = 0.95
TRANSFORMER_MIN_SQNR_DB = 20.0


# -- helpers --------------------------------------------------------------------------------------------------
@pytest.fixture
def toolkit() -> ortq.Toolkit:
    return ortq.Toolkit(autoload=False)


@pytest.fixture(scope="module")
def resnet():
    return resnet_like(seed=0)


@pytest.fixture(scope="module", params=[-1e4, -3.4e38], ids=["mask-1e4", "mask-3.4e38"])
def transformer(request):
    return request.param, transformer_block(seed=0, mask_value=request.param)


def run_quantized(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run as a user would: default session options (all graph optimizations), CPU provider."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds)
    return out


def default_opset(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def compare(label: str, reference: np.ndarray, actual: np.ndarray, logits: bool = False) -> dict[str, float | None]:
    """SQNR, max error, cosine and (for logits) top-1 agreement; printed so ``pytest -s`` shows them."""
    assert actual.shape == reference.shape
    assert np.all(np.isfinite(actual)), f"{label}: the quantized model produced NaN or Inf"
    figures = {
        "sqnr_db": sqnr_db(reference, actual),
        "max_abs_error": max_abs_error(reference, actual),
        "cosine": cosine_similarity(reference, actual),
        "top1": top1_agreement(reference, actual) if logits else None,
    }
    top1 = f", top-1 agreement {figures['top1']:.4f}" if logits else ""
    print(
        f"\n[accuracy] {label}: SQNR {figures['sqnr_db']:.2f} dB{top1}, cosine {figures['cosine']:.6f}, "
        f"max abs error {figures['max_abs_error']:.4g} ({reference.shape[0]} evaluation samples)"
    )
    return figures


def check_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def dq_weight_inputs(model: onnx.ModelProto, op_type: str) -> list[bool]:
    """For every ``op_type`` node: is its input 1 (the weight) produced by a DequantizeLinear?"""
    producer = {o: n for n in model.graph.node for o in n.output}
    return [
        node.input[1] in producer and producer[node.input[1]].op_type == "DequantizeLinear"
        for node in model.graph.node
        if node.op_type == op_type
    ]


def dq_weight_inputs_by_name(model: onnx.ModelProto) -> dict[str, bool]:
    producer = {o: n for n in model.graph.node for o in n.output}
    return {
        node.name: node.input[1] in producer and producer[node.input[1]].op_type == "DequantizeLinear"
        for node in model.graph.node
        if len(node.input) > 1
    }


def quantized_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the activation zero points used by QuantizeLinear nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


# -- the two reference models with defaults ------------------------------------------------------------------
def test_resnet_defaults(toolkit, resnet):
    model, calib, evaluation = resnet
    result = toolkit.quantize(model, None, calibration_data=calib, batch_size=8)
    q = result.model
    check_valid(q)

    # It really is quantized: every Conv and the Gemm read int8 weights, activations go through Q/DQ.
    assert all(dq_weight_inputs(q, "Conv")) and len(dq_weight_inputs(q, "Conv")) == 8
    assert dq_weight_inputs(q, "Gemm") == [True]
    assert op_counts(q)["QuantizeLinear"] >= 10
    assert result.plan.float_nodes == [], [(f.name, f.reason) for f in result.plan.float_nodes]
    assert result.vetoes == {}

    (reference,) = run_float(model, evaluation)
    # The head must spread its predictions over the classes, or top-1 agreement would be vacuous.
    assert len(set(reference.argmax(-1))) >= 8
    figures = compare("resnet_like uint8/int8 per-channel", reference, run_quantized(q, evaluation), logits=True)
    assert figures["sqnr_db"] >= CNN_MIN_SQNR_DB
    assert figures["top1"] >= CNN_MIN_TOP1
    print(f"[accuracy] ortq's own verification (calibration samples): {result.verification.outputs[0].sqnr_db:.2f} dB")


def test_calibration_data_forms_give_the_same_model(toolkit, resnet):
    """Stacked arrays, a list of feed dicts and a get_next() reader are the same data to min-max."""
    model, calib, _ = resnet
    stacked = toolkit.quantize(model, None, calibration_data=calib, batch_size=8, verify=False)
    batches = [{"input": calib["input"][i : i + 8]} for i in range(0, len(calib["input"]), 8)]

    class Reader:
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):  # noqa: ANN202
            return next(self._it, None)

    listed = toolkit.quantize(model, None, calibration_data=list(batches), verify=False)
    read = toolkit.quantize(model, None, calibration_data=Reader(), verify=False)
    assert stacked.calibration_samples == listed.calibration_samples == read.calibration_samples == 64
    expected = stacked.model.SerializeToString()
    assert listed.model.SerializeToString() == expected
    assert read.model.SerializeToString() == expected


def test_transformer_defaults(toolkit, transformer):
    mask_value, (model, calib, evaluation) = transformer
    result = toolkit.quantize(model, None, calibration_data=calib, batch_size=8)
    q = result.model
    check_valid(q)

    # The six projections with constant weights are integer MatMuls ...
    projections = ("q_matmul", "k_matmul", "v_matmul", "attn_out_matmul", "ffn_in_matmul", "ffn_out_matmul")
    weight_is_dq = dq_weight_inputs_by_name(q)
    for name in projections:
        assert result.plan.quantized_nodes.get(name) == "MatMul", name
        assert weight_is_dq[name], name
    # ... while the attention core and the mask path stay float: quantizing a -3.4e38 fill would leave
    # every real score at the zero point.
    float_names = {f.name for f in result.plan.float_nodes}
    assert {"scores", "probs", "context", "mask_bias", "scores_masked"} <= float_names
    assert not any("mask" in t for t in result.params), sorted(t for t in result.params if "mask" in t)

    (reference,) = run_float(model, evaluation)
    figures = compare(f"transformer_block mask_value={mask_value:g} uint8/int8", reference, run_quantized(q, evaluation))
    assert figures["sqnr_db"] >= TRANSFORMER_MIN_SQNR_DB


# -- scheme options -----------------------------------------------------------------------------------------
def test_int16_activations_use_opset_21_and_beat_uint8(toolkit, resnet):
    model, calib, evaluation = resnet
    (reference,) = run_float(model, evaluation)
    base = toolkit.quantize(model, None, calibration_data=calib, batch_size=8)
    a16 = toolkit.quantize(
        model, None, calibration_data=calib, batch_size=8, activation_type="int16", weight_type="int8"
    )
    q = a16.model
    check_valid(q)
    assert default_opset(model) == 17  # the caller's model is untouched
    assert default_opset(q) == 21
    assert q.ir_version >= 10
    assert quantized_types(q) == {onnx.TensorProto.INT16}
    weights = {i.data_type for i in q.graph.initializer if i.name.endswith("_quantized") and i.data_type != onnx.TensorProto.INT32}
    assert weights == {onnx.TensorProto.INT8}

    sqnr_u8 = compare("resnet_like uint8 activations", reference, run_quantized(base.model, evaluation), logits=True)["sqnr_db"]
    sqnr_16 = compare("resnet_like int16 activations", reference, run_quantized(q, evaluation), logits=True)["sqnr_db"]
    assert sqnr_16 > sqnr_u8


def test_int16_activations_transformer(toolkit):
    model, calib, evaluation = transformer_block(seed=0)
    (reference,) = run_float(model, evaluation)
    base = toolkit.quantize(model, None, calibration_data=calib, batch_size=8)
    a16 = toolkit.quantize(
        model, None, calibration_data=calib, batch_size=8, activation_type="int16", weight_type="int8"
    )
    check_valid(a16.model)
    assert default_opset(a16.model) == 21
    sqnr_u8 = sqnr_db(reference, run_quantized(base.model, evaluation))
    sqnr_16 = compare("transformer_block int16 activations", reference, run_quantized(a16.model, evaluation))["sqnr_db"]
    assert sqnr_16 > sqnr_u8


def test_per_tensor_weights_keep_opset_and_have_no_axis(toolkit, resnet):
    model, calib, evaluation = resnet
    result = toolkit.quantize(model, None, calibration_data=calib, batch_size=8, per_channel=False)
    q = result.model
    check_valid(q)
    assert default_opset(q) == default_opset(model) == 17
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs
    assert [n.name for n in dqs if any(a.name == "axis" for a in n.attribute)] == []
    inits = {i.name: i for i in q.graph.initializer}
    assert all(len(inits[n.input[1]].dims) == 0 for n in dqs if n.input[1] in inits), "per-tensor scales are scalars"
    (reference,) = run_float(model, evaluation)
    figures = compare("resnet_like per-tensor weights", reference, run_quantized(q, evaluation), logits=True)
    assert figures["sqnr_db"] >= CNN_MIN_SQNR_DB - 5
    assert figures["top1"] >= CNN_MIN_TOP1


def test_symmetric_activations(toolkit, resnet):
    model, calib, evaluation = resnet
    result = toolkit.quantize(model, None, calibration_data=calib, batch_size=8, activation_symmetric=True)
    q = result.model
    check_valid(q)
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = {
        int(onnx.numpy_helper.to_array(inits[n.input[2]]))
        for n in q.graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert zero_points == {128}, "uint8 symmetric activations put real zero at 128"
    (reference,) = run_float(model, evaluation)
    figures = compare("resnet_like symmetric uint8 activations", reference, run_quantized(q, evaluation), logits=True)
    assert figures["sqnr_db"] >= CNN_MIN_SQNR_DB - 5
    assert figures["top1"] >= CNN_MIN_TOP1


# -- model handling ------------------------------------------------------------------------------------------
def test_opset9_model_is_upgraded_with_a_warning(toolkit, caplog):
    model, calib, evaluation = opset9_conv_relu()
    assert default_opset(model) == 9
    with caplog.at_level(logging.WARNING, logger="ortq"):
        result = toolkit.quantize(model, None, calibration_data=calib, batch_size=8)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "opset 9" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    q = result.model
    check_valid(q)
    assert default_opset(q) >= 13  # per-channel DequantizeLinear needs opset 13
    assert q.ir_version >= 7
    assert all(dq_weight_inputs(q, "Conv")) and len(dq_weight_inputs(q, "Conv")) == 2
    (reference,) = run_float(model, evaluation)
    figures = compare("opset-9 conv_relu upgraded", reference, run_quantized(q, evaluation))
    assert figures["sqnr_db"] >= CNN_MIN_SQNR_DB - 5


def test_input_model_file_and_proto_are_not_modified(toolkit, resnet, tmp_path):
    model, calib, _ = resnet
    source = tmp_path / "float.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    proto_before = model.SerializeToString()
    out = tmp_path / "quantized.onnx"

    result = toolkit.quantize(source, out, calibration_data=calib, batch_size=8)
    assert source.read_bytes() == before
    assert out.is_file() and out.read_bytes() != before
    check_valid(onnx.load(out))
    assert onnx.load(out).SerializeToString() == result.model.SerializeToString()

    # Quantizing the proto itself (also to an in-memory result) leaves it as it was.
    toolkit.quantize(model, None, calibration_data=calib, batch_size=8, activation_type="int16")
    assert model.SerializeToString() == proto_before
