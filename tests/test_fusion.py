"""What ONNX Runtime's CPU provider makes of ortq's QDQ output: the fused integer kernels we rely on.

Each test quantizes a small pattern for the ``cpu`` target, lets ONNX Runtime optimize it at
ORT_ENABLE_EXTENDED, reads the optimized graph back from ``optimized_model_filepath`` and asserts its op
types (see /work/shared/notes/ort-cpu-qdq-fusion.md), then checks the numbers of that same optimized
session against the float model on evaluation data, so no test passes on structure alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ortq
from ortq.core.error_measures import sqnr_db

if __package__:
    from tests import models
else:
    import models

MIN_SQNR_DB = 25.0
INTEGER_MATMULS = {"QLinearMatMul", "MatMulIntegerToFloat"}


@dataclass
class Optimized:
    result: object  # ortq's QuantizationResult
    graph: onnx.GraphProto  # as optimized by ONNX Runtime
    sqnr_db: float

    @property
    def ops(self) -> Counter:
        return Counter(n.op_type for n in self.graph.node)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if tensor in n.output), None)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def nodes(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type == op_type]


@pytest.fixture
def toolkit() -> ortq.Toolkit:
    return ortq.Toolkit(autoload=False)


@pytest.fixture
def quantize_optimized(toolkit, tmp_path):
    """Quantize a built pattern for the cpu target, optimize it in ONNX Runtime, measure it."""

    def run(built, label: str, **options) -> Optimized:
        model, calib, evaluation = built
        result = toolkit.quantize(model, None, calibration_data=calib, batch_size=16, **options)
        onnx.checker.check_model(result.model, full_check=True)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / f"{label}.optimized.onnx")
        session = ort.InferenceSession(result.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, evaluation)
        (reference,) = models.run_float(model, evaluation)
        assert np.all(np.isfinite(actual))
        sqnr = sqnr_db(reference, actual)
        graph = onnx.load(so.optimized_model_filepath).graph
        print(f"\n[fusion] {label}: SQNR {sqnr:.2f} dB; optimized ops {[n.op_type for n in graph.node]}")
        return Optimized(result, graph, sqnr)

    return run


def assert_only_io_qdq(opt: Optimized) -> None:
    """One Q at the graph input and one DQ at the graph output: nothing in between runs through float."""
    assert opt.ops["QuantizeLinear"] == 1 and opt.ops["DequantizeLinear"] == 1, opt.ops
    assert opt.producer(opt.nodes("QuantizeLinear")[0].input[0]) is None  # it reads the graph input
    assert opt.nodes("DequantizeLinear")[0].output[0] in {o.name for o in opt.graph.output}


# -- Conv and its activations --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, activation",
    [(models.conv_relu, "Relu"), (models.conv_clip, "Clip")],
    ids=["Relu", "Clip(0,6)"],
)
def test_conv_activation_fuses_into_qlinearconv(quantize_optimized, build, activation):
    opt = quantize_optimized(build(), f"conv_{activation.lower()}")
    assert opt.result.plan.float_nodes == []
    assert opt.ops["QLinearConv"] == 2
    assert opt.ops["Conv"] == 0, "a float Conv was left: the activation did not fold into the integer kernel"
    assert opt.ops[activation] == 0
    assert_only_io_qdq(opt)
    # The folded activation's clamp is the output quantizer's: zero point at the uint8 minimum.
    assert opt.sqnr_db >= MIN_SQNR_DB


def test_residual_add_of_two_convs_becomes_qlinearadd(quantize_optimized):
    opt = quantize_optimized(models.conv_residual_add(), "conv_residual_add")
    assert opt.result.plan.float_nodes == []
    assert opt.ops["QLinearAdd"] == 1
    assert opt.ops["Add"] == 0 and opt.ops["Conv"] == 0 and opt.ops["Relu"] == 0
    assert opt.ops["QLinearConv"] == 4
    (add,) = opt.nodes("QLinearAdd")
    # QLinearAdd inputs: A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp; both operands straight from convs
    assert {opt.producer(add.input[0]).op_type, opt.producer(add.input[3]).op_type} == {"QLinearConv"}
    assert_only_io_qdq(opt)
    assert opt.sqnr_db >= MIN_SQNR_DB


def test_concat_of_two_quantized_branches_becomes_qlinearconcat(quantize_optimized):
    opt = quantize_optimized(models.conv_concat(), "conv_concat")
    assert opt.ops["QLinearConcat"] == 1
    assert opt.ops["Concat"] == 0 and opt.ops["Conv"] == 0
    assert_only_io_qdq(opt)
    assert opt.sqnr_db >= MIN_SQNR_DB


# -- data movement between integer kernels -------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, moved",
    [
        (models.conv_maxpool_conv, ("MaxPool",)),
        (models.conv_reshape_transpose_conv, ("Reshape", "Transpose")),
        (models.conv_resize_conv, ("Resize",)),
    ],
    ids=["MaxPool", "Reshape-Transpose-Reshape", "Resize-nearest"],
)
def test_data_movement_runs_on_8bit_data(quantize_optimized, build, moved):
    built = build()
    opt = quantize_optimized(built, built[0].graph.name)
    assert opt.result.plan.float_nodes == []
    assert opt.ops["QLinearConv"] == 2 and opt.ops["Conv"] == 0
    integer_or_moving = {"QLinearConv", *moved}
    for op in moved:
        nodes = opt.nodes(op)
        assert nodes, f"{op} disappeared from the optimized graph"
        for node in nodes:
            source = opt.producer(node.input[0])
            assert source is not None and source.op_type in integer_or_moving, (
                f"{op} reads {source.op_type if source else 'a graph input'}, not 8-bit data"
            )
            assert {c.op_type for c in opt.consumers(node.output[0])} <= integer_or_moving
    assert_only_io_qdq(opt)
    assert opt.sqnr_db >= MIN_SQNR_DB


# -- MatMul and Gemm with constant weights -------------------------------------------------------------------
def test_matmul_with_constant_weight_is_an_integer_matmul(quantize_optimized):
    opt = quantize_optimized(models.matmul_const(), "matmul_const")
    assert opt.result.plan.quantized_nodes == {"matmul": "MatMul"}
    assert sum(opt.ops[op] for op in INTEGER_MATMULS) == 1
    assert opt.ops["MatMul"] == 0
    assert opt.sqnr_db >= MIN_SQNR_DB


@pytest.mark.parametrize("seq", [None, 8], ids=["2-D", "3-D"])
def test_matmul_bias_add_is_not_requantized(quantize_optimized, seq):
    opt = quantize_optimized(models.matmul_bias(seq=seq), f"matmul_bias_{seq}")
    assert opt.result.plan.quantized_nodes == {"matmul": "MatMul", "bias": "Add"}
    assert "mm" in opt.result.plan.folded  # no Q/DQ between the MatMul and its bias
    assert opt.ops["QLinearAdd"] == 0 and opt.ops["MatMul"] == 0
    # 2-D fuses into one QGemm; with a dynamic leading axis ORT keeps MatMulIntegerToFloat + Add.
    assert opt.ops["QGemm" if seq is None else "MatMulIntegerToFloat"] == 1
    assert opt.sqnr_db >= MIN_SQNR_DB


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB=0", "transB=1"])
def test_gemm_becomes_qgemm(quantize_optimized, trans_b):
    opt = quantize_optimized(models.gemm(trans_b=trans_b), f"gemm_transB{trans_b}")
    assert opt.result.plan.quantized_nodes == {"gemm": "Gemm"}
    assert opt.ops["QGemm"] == 1
    assert opt.ops["Gemm"] == 0
    assert opt.sqnr_db >= MIN_SQNR_DB


# -- attention: what must stay float on the cpu target -------------------------------------------------------
@pytest.fixture
def attention(quantize_optimized) -> Optimized:
    return quantize_optimized(models.attention_core(), "attention_core")


def test_attention_softmax_and_activation_matmuls_are_planned_float(attention):
    plan = attention.result.plan
    reasons = {f.name: f.reason for f in plan.float_nodes}
    assert set(reasons) == {"scores", "softmax", "context", "k_t"}, reasons
    assert reasons["k_t"] == "its output feeds only float ops"  # a Transpose feeding only the float scores
    for name in ("scores", "context"):
        assert "activation" in reasons[name].lower(), reasons[name]
    assert any(word in reasons["softmax"].lower() for word in ("softmax", "cpu")), reasons["softmax"]
    for name in ("q", "k", "v", "out"):
        assert plan.quantized_nodes.get(name) == "MatMul", name
    assert attention.sqnr_db >= MIN_SQNR_DB


def test_attention_softmax_and_context_matmul_run_float(attention):
    softmax = attention.producer("softmax")
    assert softmax is not None and softmax.op_type == "Softmax"
    assert attention.ops["QLinearSoftmax"] == 0
    assert attention.producer(softmax.input[0]).op_type != "DequantizeLinear"
    assert "QuantizeLinear" not in {c.op_type for c in attention.consumers("softmax")}
    context = attention.producer("context")
    assert context is not None and context.op_type == "MatMul"
    # The four projections with constant weights (q, k, v, out) are integer kernels.
    assert sum(attention.ops[op] for op in INTEGER_MATMULS) >= 4


def test_attention_scores_matmul_runs_float(attention):
    scores = attention.producer("scores")
    # float: plain MatMul, or ORT's FusedMatMul once the float Transpose folds into it
    assert scores is not None and scores.op_type in {"MatMul", "FusedMatMul"}, scores.op_type if scores else None
    assert all(attention.producer(t).op_type != "DequantizeLinear" for t in scores.input if attention.producer(t))
