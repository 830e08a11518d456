"""ESP-DL v3 ``.espdl`` files: the reader on Espressif's own files, the integer reference bit for bit against the
test outputs Espressif embedded, and ortq's writer (read back, bit-exact embedded outputs, close to ONNX Runtime).

Espressif's files live in ``../shared/espdl`` (beside the repository); the tests that need them skip without it.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run

from ortq.plugins.backends.esp32.espdl.layout import pack_filter, unpack_filter
from ortq.plugins.backends.esp32.espdl.reader import EspdlError, read_espdl, split_container
from ortq.plugins.backends.esp32.espdl.reference import HALF_EVEN, HALF_UP, Reference, check_test_values, round_shift
from ortq.plugins.backends.esp32.espdl.writer import write_espdl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "espdl" / "v3" / "examples"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="Espressif's .espdl files (../shared/espdl) are absent")
CHIP_OF = {"s3": "esp32s3", "p4": "esp32p4"}


# -- container, rounding, layouts (no shared files needed) ------------------------------------------------------
def test_container_refuses_encrypted_and_foreign_files() -> None:
    payload = b"\0" * 32
    with pytest.raises(EspdlError, match="encrypted"):
        split_container(b"EDL2" + struct.pack("<II", 1, len(payload)) + b"\0" * 4 + payload)
    with pytest.raises(EspdlError, match="EDL2"):
        split_container(b"EDL1" + b"\0" * 40)
    with pytest.raises(EspdlError, match="truncated"):
        split_container(b"EDL2" + struct.pack("<II", 0, 999) + b"\0" * 4 + payload)
    assert split_container(b"EDL2" + struct.pack("<II", 0, len(payload)) + b"\0" * 4 + payload) == payload


def test_round_shift_half_up_and_half_even() -> None:
    x = np.array([-6, -5, -3, -2, -1, 1, 2, 3, 5, 6, 7], dtype=np.int64)  # /2 and /4 give ties
    assert round_shift(x, 1, HALF_UP).tolist() == [-3, -2, -1, -1, 0, 1, 1, 2, 3, 3, 4]
    assert round_shift(x, 1, HALF_EVEN).tolist() == [-3, -2, -2, -1, 0, 0, 1, 2, 2, 3, 4]
    assert round_shift(x, 2, HALF_UP).tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2]
    assert round_shift(x, 2, HALF_EVEN).tolist() == [-2, -1, -1, 0, 0, 0, 0, 1, 1, 2, 2]
    assert round_shift(x, -2, HALF_UP).tolist() == (x * 4).tolist()


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("n,c,depthwise", [(32, 3, False), (20, 5, False), (7, 2, False), (24, 1, True), (19, 1, True)])
def test_filter_layout_round_trips(dtype, n: int, c: int, depthwise: bool) -> None:
    w = np.random.default_rng(n).integers(-100, 100, (n, c, 3, 2)).astype(dtype)
    flat, dims = pack_filter(w, depthwise)
    assert dims == ([3, 2, n, c] if depthwise else [3, 2, c, n]) and flat.size == w.size
    np.testing.assert_array_equal(unpack_filter(flat, dims, depthwise), w)
    align = 16 if dtype == np.int8 else 8
    if n >= align:  # the first block holds output channels 0..align-1 innermost, for kernel position (0, 0), c = 0
        np.testing.assert_array_equal(flat[:align], w[:align, 0, 0, 0])


# -- Espressif's files -----------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("target", ["s3", "p4"])
def test_reader_parses_espressifs_files(target: str) -> None:
    model = read_espdl(SHARED / target / "model.espdl")
    g = model.graph
    assert [n.op_type for n in g.nodes] == ["Gemm", "Gemm", "Gemm"]
    assert [n.attributes["activation"] for n in g.nodes] == ["Relu", "Relu", "Linear"]
    assert all(n.attributes["quant_type"] == "S8" and n.attributes["transB"] == 0 for n in g.nodes)
    w2 = g.initializers["fc2.weight"]
    assert w2.dtype == np.int8 and w2.dims == (1, 1, 64, 64) and w2.layout == "N16HWC16"
    assert g.initializers["fc3.weight"].layout == "N16HWC16_UNALIGNED"
    # Biases are int32 at the exponent input + weight, as esp-ppq quantizes them.
    for node in g.nodes:
        x, w, b = node.inputs
        assert g.initializers[b].dtype == np.int32
        assert g.initializers[b].exponent == g.value(x).exponent + g.initializers[w].exponent
    assert list(g.test_inputs) == [g.inputs[0].name] and list(g.test_outputs) == [g.outputs[0].name]
    assert g.inputs[0].shape == (1, 1) and g.inputs[0].dtype == np.int8


@needs_shared
@pytest.mark.parametrize("target", ["s3", "p4"])
def test_reference_reproduces_espressifs_embedded_outputs(target: str) -> None:
    model = read_espdl(SHARED / target / "model.espdl")
    for name, (expected, got) in check_test_values(model, CHIP_OF[target]).items():
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected, err_msg=name)


@needs_shared
def test_reference_reads_the_packed_filters_right() -> None:
    """One embedded sample checks little, so also: Espressif's tutorial MLP fits sin(x) on [0, 2*pi] (input
    exponent -4, output -7), which only the right filter unpacking reproduces (plain NHWC order gives errors > 1)."""
    model = read_espdl(SHARED / "s3" / "model.espdl")
    ref = Reference(model, "esp32s3")
    q = np.arange(0, 101)
    out = np.array([ref.run({model.graph.inputs[0].name: np.array([[v]], np.int8)})["11"][0, 0] for v in q])
    assert np.abs(out / 128.0 - np.sin(q / 16.0)).max() < 0.25


# -- ortq's writer -----------------------------------------------------------------------------------------------
def _quantize(model, calibration, chip: str) -> onnx.ModelProto:
    import ortq

    result = ortq.Toolkit(autoload=False).quantize(
        model, calibration_data=calibration, target="esp32", backend_options={"chip": chip}
    )
    return result.model


def _check_written(qdq: onnx.ModelProto, chip: str, x: np.ndarray, path: Path):
    write_espdl(qdq, chip, path, test_input=x)
    back = read_espdl(path)
    assert back.producer_name == "ortq" and back.metadata_props["target"] == chip
    for name, (expected, got) in check_test_values(back, chip).items():
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # The filters in the file are the QDQ model's own integers.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    inits.update({n.output[0]: inits[n.input[0]] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits})
    for node in back.graph.nodes:
        if node.op_type == "Conv":
            t = back.graph.initializers[node.inputs[1]]
            w = unpack_filter(t.data, t.dims, node.attributes["group"] > 1)
            np.testing.assert_array_equal(w, inits[node.inputs[1]])
    assert not any(t.dtype == np.int8 and len(t.exponents) > 1 for t in back.graph.initializers.values()) or chip == "esp32p4"
    (out,) = back.graph.outputs
    y = back.graph.test_outputs[out.name]
    (expected,) = run(qdq, {qdq.graph.input[0].name: x})
    return y.data.astype(np.float64) * 2.0**y.exponent, expected, 2.0**y.exponent


@pytest.mark.parametrize("chip", ["esp32s3", "esp32p4"])
def test_written_digits_model_reads_back_and_matches_onnxruntime(digits: Path, tmp_path: Path, chip: str) -> None:
    """Tolerance 2 LSB of the output: the chip requantizes a Conv+Relu once from the accumulator where the QDQ
    model rounds twice (Conv's output exponent, then Relu's), and S3 rounds ties up where ONNX Runtime rounds
    them to even; each such 1-LSB difference can move the next layer's result by about one LSB."""
    qdq = _quantize(digits / "model.onnx", digits / "calibration.npz", chip)
    with np.load(digits / "evaluation.npz") as data:
        x = data["input"][:32]
    got, expected, lsb = _check_written(qdq, chip, x, tmp_path / f"digits.{chip}.espdl")
    assert np.abs(got - expected).max() <= 2 * lsb
    assert np.mean(got.argmax(1) == expected.argmax(1)) == 1.0


@pytest.mark.parametrize("chip", ["esp32s3", "esp32p4"])
def test_written_residual_cnn_reads_back_and_matches_onnxruntime(tmp_path: Path, chip: str) -> None:
    """A residual CNN (MaxPool, three Adds with Relu, GAP, Gemm). Add inputs are requantized to the output's
    exponent before the integer add (esp-ppq's convention), one more rounding than the QDQ model's. On P4
    (half-even, as ONNX Runtime) that stays within 2 LSB; on S3 every tie of those 1-bit requantizations rounds
    up, a bias that accumulates through the blocks (see evaluator.py), so there the bound is an SQNR."""
    sys.path.insert(0, str(Path(__file__).parent))
    from models import resnet_like

    model, calibration, evaluation = resnet_like(n_calibration=16, n_evaluation=8)
    qdq = _quantize(model, calibration, chip)
    x = evaluation["input"][:8]
    got, expected, lsb = _check_written(qdq, chip, x, tmp_path / f"resnet.{chip}.espdl")
    ops = [n.op_type for n in read_espdl(tmp_path / f"resnet.{chip}.espdl").graph.nodes]
    assert ops.count("Add") == 3 and "RequantizeLinear" in ops and "Relu" not in ops[:1]
    sqnr = 10 * np.log10(np.sum(expected**2) / max(np.sum((got - expected) ** 2), 1e-30))
    if chip == "esp32p4":
        assert np.abs(got - expected).max() <= 2 * lsb
        assert sqnr > 20
    else:
        assert sqnr > 10
