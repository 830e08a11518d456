"""ortq debug: tensor-by-tensor comparison of a float model and its quantized version."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.tools.debug import debug_models, match_tensors

from conftest import tiny_cnn, tiny_data

HOSTILE = 4  # the output channel of conv1 made ~1000x larger


def hostile_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> relu -> conv3 -> GAP -> flatten -> gemm, where conv1's channel HOSTILE has
    ~1000x larger weights and bias than the others and conv2 divides its weights on that channel by 1000, so
    the float model computes ordinary values while per-tensor activation quantization of conv1's output
    crushes every other channel."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0.3, 0.1, 8).astype(np.float32)
    w1[HOSTILE] *= 1000.0
    b1[HOSTILE] = abs(b1[HOSTILE]) * 1000.0
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w2[:, HOSTILE] /= 1000.0
    b2 = rng.normal(0.1, 0.05, 8).astype(np.float32)
    w3 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    b3 = rng.normal(0.0, 0.05, 8).astype(np.float32)
    wf = rng.normal(0, 0.5, (5, 8)).astype(np.float32)
    bf = rng.normal(0, 0.1, 5).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in
             [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3), ("wf", wf), ("bf", bf)]]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=pads),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="conv3", pads=pads),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "hostile_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _quantize(toolkit: ortq.Toolkit, model: onnx.ModelProto, tmp_path: Path, name: str, **options) -> tuple[Path, Path]:
    float_path = tmp_path / f"{name}.onnx"
    onnx.save(model, float_path)
    quant_path = tmp_path / f"{name}.int8.onnx"
    toolkit.quantize(float_path, quant_path, calibration_data=tiny_data(32), verify=False, **options)
    return float_path, quant_path


@pytest.fixture
def hostile(toolkit: ortq.Toolkit, tmp_path: Path) -> tuple[Path, Path]:
    """Quantized with the cpu target's defaults: per-tensor u8 activations, per-channel s8 weights."""
    return _quantize(toolkit, hostile_cnn(), tmp_path, "hostile")


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_hostile_layer_ranks_first(toolkit: ortq.Toolkit, tmp_path: Path, quant_format: str) -> None:
    """cpu target defaults (per-tensor u8 activations); QOperator outputs are dequantized with the scale
    and zero point of the QLinearConv that writes them."""
    float_path, quant_path = _quantize(toolkit, hostile_cnn(), tmp_path, "hostile", quant_format=quant_format)
    report = debug_models(float_path, quant_path, tiny_data(24, seed=5), batch_size=8)
    assert report.samples == 24 and report.batches == 3
    rows = report.sorted()
    assert rows[0].tensor == "a1" and rows[0].kind == "activation" and rows[0].op_type == "Relu"
    top = rows[0]
    # The outlier channel keeps the whole-tensor SQNR respectable; the per-channel average exposes it.
    assert top.injected_channel_sqnr_db < top.injected_sqnr_db - 15
    assert top.injected_score_db < 10
    by_name = {r.tensor: r for r in rows}
    # Downstream tensors carry the accumulated damage but inject little themselves.
    assert by_name["a2"].sqnr_db < by_name["a2"].injected_sqnr_db - 10
    assert by_name["a2"].injected_score_db > top.injected_score_db + 10
    # Ranking by accumulated SQNR alone would not put the cause first.
    assert report.sorted("sqnr")[0].tensor != "a1"
    # Weights are compared against the float initializers, per channel along axis 0.
    assert by_name["w1"].kind == "weight" and by_name["w1"].per_channel and by_name["w1"].sqnr_db > 30
    assert by_name["w1"].node == "conv1" and by_name["w1"].op_type == "Conv"
    assert by_name["w1"].clipped_fraction == 0.0  # symmetric weights: nothing beyond the range
    assert top.scale > 1.0  # the outlier channel stretched the per-tensor scale


def test_numbers_match_a_direct_computation(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """SQNR, cosine and max error of streamed sums equal those of the whole tensors at once."""
    import onnxruntime as ort

    float_path, quant_path = _quantize(toolkit, tiny_cnn(), tmp_path, "tiny")
    data = tiny_data(20, seed=3)
    report = debug_models(float_path, quant_path, data, batch_size=6)
    assert report.samples == 20 and report.batches == 4
    row = next(r for r in report.tensors if r.tensor == "r1")
    assert row.quantized_tensor is not None

    def fetch(path: Path, name: str) -> np.ndarray:
        model = onnx.load(path)
        model.graph.output.append(onnx.ValueInfoProto(name=name))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run([name], data)[0]

    ref = fetch(float_path, "r1").astype(np.float64)
    qmodel = onnx.load(quant_path)
    dq = next(n for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == row.quantized_tensor)
    act = fetch(quant_path, dq.output[0]).astype(np.float64)
    assert row.sqnr_db == pytest.approx(ortq.core.error_measures.sqnr_db(ref, act), abs=1e-6)
    assert row.cosine == pytest.approx(ortq.core.error_measures.cosine_similarity(ref, act), abs=1e-9)
    assert row.max_abs_error == pytest.approx(float(np.max(np.abs(ref - act))), rel=1e-6)
    # r1 carries its own quantizer's noise plus that of the input and weights upstream.
    assert row.injected_sqnr_db > row.sqnr_db + 1
    # The graph input is exact in both models: all of its error is its own quantizer's.
    x = next(r for r in report.tensors if r.tensor == "x")
    assert x.node == "graph input" and x.order == -1
    assert x.injected_sqnr_db == pytest.approx(x.sqnr_db, abs=1e-6) and x.injected_max_abs_error == x.max_abs_error
    # The float model's final output stays float in neither model but is compared all the same.
    out = next(r for r in report.tensors if r.tensor == "y")
    assert out.sqnr_db > 20 and 0.99 < out.cosine <= 1.0 + 1e-9


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_onnxruntime_quantizer_models_match(tmp_path: Path, fmt: str) -> None:
    """Models from onnxruntime.quantization match too: QDQ (``_QuantizeLinear_Output`` naming) and
    QOperator (QLinearConv with the Relu folded in, QLinearGlobalAveragePool, QGemm with an int32 bias)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), float_path)
    feeds = [{"x": tiny_data(16)["x"][i : i + 4]} for i in range(0, 16, 4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    quant_path = tmp_path / f"tiny.{fmt}.onnx"
    quantize_static(str(float_path), str(quant_path), Reader(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    report = debug_models(float_path, quant_path, feeds)
    names = {r.tensor: r for r in report.tensors}
    assert {"x", "r1", "g", "y", "w1", "w2", "b1", "b2"} <= names.keys(), sorted(names)
    assert report.unmatched == []
    assert all(r.sqnr_db > 25 for r in report.tensors), [(r.tensor, r.sqnr_db) for r in report.tensors]
    assert all(r.clipped_fraction < 0.01 for r in report.tensors if r.kind == "activation")
    assert names["w1"].kind == "weight" and names["x"].kind == "activation"
    assert names["b1"].quant_type == "int32" and names["b1"].sqnr_db > 50
    if fmt == "QOperator":
        assert names["r1"].quantized_tensor == "c1_quantized"  # QLinearConv's output holds Relu(c1)


def test_match_structural_and_by_name() -> None:
    """A QDQ pair with arbitrary names matches through the QuantizeLinear's input; a renamed weight through
    the consumer node of the same name; FreshNames suffixes are stripped."""
    f = tiny_cnn()
    q = onnx.ModelProto()
    q.CopyFrom(f)
    g = q.graph
    w = numpy_helper.to_array(next(i for i in g.initializer if i.name == "w1"))
    s = float(np.abs(w).max() / 127)
    g.initializer.extend([
        numpy_helper.from_array(np.rint(w / s).astype(np.int8), "mystery"),
        numpy_helper.from_array(np.array(s, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "as"),
        numpy_helper.from_array(np.array(0, np.uint8), "az"),
    ])
    nodes = list(g.node)
    del g.node[:]
    g.node.extend([
        helper.make_node("DequantizeLinear", ["mystery", "ws", "wz"], ["whatever"], name="dqw"),
        nodes[0], nodes[1],
        helper.make_node("QuantizeLinear", ["r1", "as", "az"], ["q_7"], name="qa"),
        helper.make_node("DequantizeLinear", ["q_7", "as", "az"], ["r1_dequantized_2"], name="dqa"),
        *nodes[2:],
    ])
    g.node[1].input[1] = "whatever"
    g.node[4 + 1].input[0] = "r1_dequantized_2"
    matches, unmatched = match_tensors(f, q)
    found = {m.name: (m.float_name, m.matched_by) for m in matches}
    assert found == {"mystery": ("w1", "consumer"), "q_7": ("r1", "quantize-input")}
    assert unmatched == []


def test_json_validates_against_shipped_schema(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((resources.files("ortq") / "schemas" / "debug-report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    float_path, quant_path = hostile
    out = tmp_path / "report.json"
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), [
        "debug", str(float_path), str(quant_path), "-d", str(_npz(tmp_path)), "--json", str(out), "--top", "3",
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "sorted by injected" in lines[0]
    assert lines[3].split()[:2] == ["1", "a1"]  # rank 1 is the hostile layer's output
    document = json.loads(out.read_text())
    jsonschema.validate(document, schema)
    assert document["tensors"][0]["tensor"] == "a1"
    # A broken document is refused (the schema constrains, it does not accept anything).
    broken = dict(document, tensors=[dict(document["tensors"][0], sqnr_db="high")])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _npz(tmp_path: Path, n: int = 16) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **tiny_data(n, seed=7))
    return path


EVIL = '<script>alert(1)</script>"&'


def _evil_models(toolkit: ortq.Toolkit, tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_cnn()
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == "r1":
                node.output[i] = EVIL
        for i, name in enumerate(node.input):
            if name == "r1":
                node.input[i] = EVIL
        if node.name == "relu":
            node.name = EVIL + "node"
    return _quantize(toolkit, model, tmp_path, "evil")


def test_html_is_self_contained_and_escaped(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    float_path, quant_path = _evil_models(toolkit, tmp_path)
    report = debug_models(float_path, quant_path, tiny_data(8))
    assert any(r.tensor == EVIL for r in report.tensors)
    page = report.to_html()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;" in page
    assert page.count("<script>") == 1  # only the sorting script
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page
    try:
        import matplotlib  # noqa: F401
        assert "data:image/png;base64," in page
    except ImportError:
        assert "needs matplotlib" in page


def test_html_without_matplotlib_says_so(hostile: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    report = debug_models(*hostile, tiny_data(8))
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import raise ImportError
    page = report.to_html()
    assert "needs matplotlib" in page and "pip install 'ortq[report]'" in page
    assert "data:image/png" not in page and '<table id="tensors">' in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_opens_in_headless_chromium(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    float_path, quant_path = _evil_models(toolkit, tmp_path)
    page = tmp_path / "report.html"
    page.write_text(debug_models(float_path, quant_path, tiny_data(8)).to_html(sort="order"), encoding="utf-8")
    # Clicking the "SQNR dB" header must run the sorting script without errors: do it on load.
    with page.open("a", encoding="utf-8") as f:
        f.write("<script>document.querySelectorAll('#tensors th')[8].click();"
                "document.body.setAttribute('data-sorted', document.querySelector('#tensors th[data-dir]') ? "
                "'yes' : 'no');</script>\n")
    profile = tmp_path / "profile"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert '<table id="tensors">' in dom and 'data-sorted="yes"' in dom
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # The sorted DOM lists rows by ascending SQNR.
    rows = dom.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    sqnr = [float(r.split('data-v="')[9].split('"')[0] or "inf") for r in rows]
    assert sqnr == sorted(sqnr) and len(sqnr) >= 4


def test_cli_table_sort_and_html(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    float_path, quant_path = hostile
    cli = build_cli(ortq.Toolkit(autoload=False))
    html_path = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["debug", str(float_path), str(quant_path), "-d", str(_npz(tmp_path)),
                                      "--sort", "order", "--top", "0", "--html", str(html_path)])
    assert result.exit_code == 0, result.output
    assert "sorted by order" in result.output and html_path.is_file()
    body = result.output.splitlines()[3:]
    ranked = [line.split()[1] for line in body if line.split() and line.split()[0].isdigit()]
    assert ranked.index("x") < ranked.index("a1") < ranked.index("a2")


def test_bad_inputs_fail_clearly(toolkit: ortq.Toolkit, tmp_path: Path, hostile: tuple[Path, Path]) -> None:
    float_path, quant_path = hostile
    cli = build_cli(ortq.Toolkit(autoload=False))
    data = _npz(tmp_path)
    runner = CliRunner()

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    result = runner.invoke(cli, ["debug", str(float_path), str(corrupt), "-d", str(data)])
    assert result.exit_code == 1 and "corrupt.onnx" in result.output

    # A float model given as the quantized one: nothing is quantized.
    result = runner.invoke(cli, ["debug", str(float_path), str(float_path), "-d", str(data)])
    assert result.exit_code == 1 and "no quantized tensors" in result.output

    # Another model's quantization: same input, nothing else matches.
    other = tiny_cnn()
    for node in other.graph.node:
        node.name = "other_" + node.name
        node.output[:] = ["o_" + o for o in node.output]
        node.input[:] = ["o_" + i if i != "x" else i for i in node.input]
    other.graph.output[0].name = "o_y"
    for init in other.graph.initializer:
        init.name = "o_" + init.name
    _, other_q = _quantize(toolkit, other, tmp_path, "other")
    with pytest.raises(ortq.ModelError, match="only its inputs match"):
        debug_models(tiny_cnn(), other_q, tiny_data(4))

    # Models reading different inputs.
    renamed = hostile_cnn()
    renamed.graph.input[0].name = "image"
    renamed.graph.node[0].input[0] = "image"
    with pytest.raises(ortq.ModelError, match="inputs differ"):
        debug_models(renamed, quant_path, tiny_data(4))

    with pytest.raises(ortq.ConfigError, match="unknown sort key"):
        debug_models(float_path, quant_path, tiny_data(4)).sorted("best")
    result = runner.invoke(cli, ["debug", str(float_path), str(quant_path), "-d", str(tmp_path / "missing.npz")])
    assert result.exit_code == 1 and "missing.npz" in result.output


def test_statistics_stream_over_batches(hostile: tuple[Path, Path]) -> None:
    """Sums over 20 batches give the same weights rows and close activation numbers as over 2."""
    few = debug_models(*hostile, tiny_data(16, seed=2), batch_size=8)
    many = debug_models(*hostile, tiny_data(160, seed=2), batch_size=8, max_samples=160)
    assert many.samples == 160 and many.batches == 20
    a = {r.tensor: r for r in few.tensors}
    b = {r.tensor: r for r in many.tensors}
    assert a.keys() == b.keys()
    for name in a:
        if a[name].kind == "weight":
            assert a[name].sqnr_db == b[name].sqnr_db
        elif math.isfinite(a[name].sqnr_db):
            assert abs(a[name].sqnr_db - b[name].sqnr_db) < 6


def test_qat_style_fake_quantized_weights() -> None:
    """A QAT export keeps float weights and fake-quantizes them in the graph (initializer -> Q -> DQ): the
    weight is still matched to the float initializer, reported as a weight, and its numbers come from the run."""
    f = tiny_cnn()
    q = onnx.ModelProto()
    q.CopyFrom(f)
    g = q.graph
    w = numpy_helper.to_array(next(i for i in g.initializer if i.name == "w1"))
    scales = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
    g.initializer.extend([
        numpy_helper.from_array(scales, "w1_s"), numpy_helper.from_array(np.zeros(8, np.int8), "w1_z"),
        numpy_helper.from_array(np.array(0.02, np.float32), "r1_s"), numpy_helper.from_array(np.array(0, np.uint8), "r1_z"),
    ])
    nodes = list(g.node)
    del g.node[:]
    g.node.extend([
        helper.make_node("QuantizeLinear", ["w1", "w1_s", "w1_z"], ["w1_q"], name="w1_fq_q", axis=0),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1_fq"], name="w1_fq_dq", axis=0),
        nodes[0], nodes[1],
        helper.make_node("QuantizeLinear", ["r1", "r1_s", "r1_z"], ["r1_q"], name="r1_fq_q"),
        helper.make_node("DequantizeLinear", ["r1_q", "r1_s", "r1_z"], ["r1_fq"], name="r1_fq_dq"),
        *nodes[2:],
    ])
    g.node[2].input[1] = "w1_fq"
    g.node[6].input[0] = "r1_fq"
    onnx.checker.check_model(q)
    report = debug_models(f, q, tiny_data(8))
    rows = {r.tensor: r for r in report.tensors}
    assert rows.keys() == {"w1", "r1", "y"}
    assert rows["w1"].kind == "weight" and rows["w1"].per_channel and rows["w1"].matched_by == "quantize-input"
    assert rows["w1"].sqnr_db > 35 and rows["w1"].injected_sqnr_db == pytest.approx(rows["w1"].sqnr_db, abs=1e-6)
    assert rows["w1"].elements == w.size  # fetched once: the 8 samples are one batch
    assert rows["r1"].clipped_fraction > 0  # a 0.02 step tops out at 5.1: the larger ReLU outputs clip
    assert rows["y"].kind == "output" and rows["y"].quantized_tensor is None


def test_dynamic_quantization(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """Dynamic models: activations quantized at run time are dequantized with each batch's own scale, int8
    weights of MatMulIntegerToFloat / DynamicQuantizeMatMul are matched, and the float tensors those kernels
    write are compared by name."""
    from models import transformer_block

    model, _, evaluation = transformer_block()
    float_path = tmp_path / "block.onnx"
    onnx.save(model, float_path)
    quant_path = tmp_path / "block.dyn.onnx"
    toolkit.quantize_dynamic(float_path, quant_path)
    ops = {n.op_type for n in onnx.load(quant_path).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulIntegerToFloat" in ops
    report = debug_models(float_path, quant_path, evaluation, batch_size=16)
    rows = {r.tensor: r for r in report.tensors}
    hidden = rows["hidden"]
    assert hidden.kind == "activation" and hidden.scale is None  # a new scale every batch
    assert hidden.injected_sqnr_db == pytest.approx(hidden.sqnr_db, abs=1e-6) and 25 < hidden.sqnr_db < 60
    weights = [r for r in report.tensors if r.kind == "weight"]
    assert {"q_w", "k_w", "v_w"} <= {r.tensor for r in weights} and all(r.sqnr_db > 30 for r in weights)
    assert rows["q_out"].kind == "float" and rows["q_out"].injected_sqnr_db is None and rows["q_out"].sqnr_db > 25
    assert rows["output"].kind == "output"


def test_integer_graph_output_is_left_out(toolkit: ortq.Toolkit) -> None:
    """A classifier that also outputs its ArgMax label: the int64 output has no SQNR and gets no row (it made
    the report crash), while every float tensor is still compared."""
    model = tiny_cnn()
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], name="argmax", axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    onnx.checker.check_model(model)
    quantized = toolkit.quantize(model, None, calibration_data=tiny_data(16), verify=False).model
    report = debug_models(model, quantized, tiny_data(8))
    rows = {r.tensor: r for r in report.tensors}
    assert "label" not in rows
    assert {"x", "r1", "y", "w1"} <= rows.keys() and rows["y"].sqnr_db > 20


def _dequantized(model: onnx.ModelProto, node: onnx.NodeProto, weight: int, scale: int, zero_point: int) -> np.ndarray:
    """A kernel's integer weight dequantized by hand, in the kernel's own layout (per-column scales on the last
    axis, per-direction ones on the first)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = inits[node.input[weight]].astype(np.float64)
    s, z = inits[node.input[scale]].astype(np.float64), inits[node.input[zero_point]].astype(np.float64)
    if q.ndim == 3:  # DynamicQuantizeLSTM: [directions, k, 4*hidden], scales [directions] or [directions, 4*hidden]
        s, z = (s[:, None, None], z[:, None, None]) if s.ndim == 1 else (s[:, None, :], z[:, None, :])
    return (q - z) * s


def _channel_mean_db(ref: np.ndarray, actual: np.ndarray, axis: int) -> float:
    moved = np.moveaxis(ref.astype(np.float64), axis, 0).reshape(ref.shape[axis], -1)
    err = moved - np.moveaxis(actual, axis, 0).reshape(ref.shape[axis], -1)
    return float(np.mean(np.minimum(10 * np.log10((moved**2).sum(1) / (err**2).sum(1)), 120.0)))


@pytest.mark.parametrize("quantizer", ["ortq", "onnxruntime"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_lstm_weights_and_outputs(tmp_path: Path, quantizer: str, per_channel: bool) -> None:
    """DynamicQuantizeLSTM keeps W and R transposed ([directions, k, 4*hidden]) with per-direction or per-gate-
    column scales: both are compared with the float LSTM's W and R in its layout (per-channel statistics over
    the gate rows), and its float outputs by name, for ortq's models and ONNX Runtime's quantize_dynamic's."""
    from test_dynamic import _lstm_model

    model, feed = _lstm_model("bidirectional")
    if quantizer == "ortq":
        quantized = ortq.Toolkit(autoload=False).quantize_dynamic(model, None, per_channel=per_channel).model
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx.save(model, tmp_path / "lstm.onnx")
        quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "lstm.q.onnx", per_channel=per_channel,
                         weight_type=QuantType.QInt8)
        quantized = onnx.load(tmp_path / "lstm.q.onnx")
    lstm = next(n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM")
    report = debug_models(model, quantized, [feed])
    assert report.unmatched == []
    rows = {r.tensor: r for r in report.tensors}
    floats = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, (weight, scale, zero_point) in (("W", (1, 8, 9)), ("R", (2, 10, 11))):
        row = rows[name]
        assert (row.kind, row.quantized_tensor, row.node, row.op_type) == ("weight", lstm.input[weight], "lstm", "LSTM")
        deq = _dequantized(quantized, lstm, weight, scale, zero_point).transpose(0, 2, 1)
        assert row.sqnr_db == pytest.approx(ortq.core.error_measures.sqnr_db(floats[name], deq), abs=1e-9) and row.sqnr_db > 35
        assert row.channel_sqnr_db == pytest.approx(_channel_mean_db(floats[name], deq, 1), abs=1e-9)
        assert row.injected_sqnr_db == pytest.approx(row.sqnr_db, abs=0.01)  # the same parameters, simulated
    assert rows["Y_h"].kind == ("float" if quantizer == "ortq" else "activation") and rows["Y_h"].sqnr_db > 30
    assert rows["Y"].kind == "output" and rows["Y"].sqnr_db > 30


@pytest.mark.parametrize("per_channel", [False, True])
def test_qattention_weight_and_output(per_channel: bool) -> None:
    """QAttention's int8 QKV weight is compared with com.microsoft.Attention's (per column when per-channel);
    the attention's float output, which QAttention writes, by name."""
    pytest.importorskip("sympy", reason="symbolic shape inference needs the preprocess extra")
    from test_dynamic_attention import _feeds, _fused_encoder

    model = ortq.preprocess(_fused_encoder()).model
    quantized = ortq.Toolkit(autoload=False).quantize_dynamic(model, None, per_channel=per_channel).model
    attention = next(n for n in quantized.graph.node if n.op_type == "QAttention")
    report = debug_models(model, quantized, [_feeds()])
    rows = {r.tensor: r for r in report.tensors}
    qkv = rows["qkv"]
    assert (qkv.kind, qkv.quantized_tensor, qkv.op_type, qkv.per_channel) == ("weight", attention.input[1], "Attention",
                                                                              per_channel)
    deq = _dequantized(quantized, attention, 1, 4, 7)
    ref = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "qkv"))
    assert qkv.sqnr_db == pytest.approx(ortq.core.error_measures.sqnr_db(ref, deq), abs=1e-9) and qkv.sqnr_db > 35
    assert qkv.channel_sqnr_db == pytest.approx(_channel_mean_db(ref, deq, 1), abs=1e-9)  # per output column
    context = rows["context"]
    assert context.kind == "float" and context.quantized_tensor is None and context.sqnr_db > 25
    assert rows["x"].kind == "activation" and rows["x"].scale is None  # DynamicQuantizeLinear's per-batch scale
