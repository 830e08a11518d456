"""Every hostile or broken input, through the command line: one ``Error:`` line naming the problem, exit 1,
no traceback, nothing left in the output folder, and the input files byte-identical.

Each error case builds its inputs in ``in/`` and writes (or would write) to ``out/``, which already holds a
previous result: the run must leave both folders exactly as they were. Model-file errors are run through
every command that reads a model (static and dynamic ``quantize``, ``calibrate``, ``export cpu``, ``info``).
Inputs that are unusual but valid (opset 7, control-flow subgraphs, unknown-domain ops, ...) must quantize
through the CLI into a model that passes ``onnx.checker`` and stays close to float.

The models come from the hostile-graph, external-data and bad-input tests; only the damage is done here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run, tiny_cnn, tiny_data
from models import opset9_conv_relu
from onnx import TensorProto, helper, numpy_helper
from test_external_data import _cnn as external_cnn
from test_external_data import _data as external_data_feeds
from test_external_data import _save_external
from test_hostile_graphs import FLOOR_DB, _conv_w, _data, _model, _opset7_cnn, _out, _subgraph_model, _x

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db
from ortq.plugins.backends.cpu import CpuBackend

# -- what every failing run must leave as it was --------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (symlinks not followed) with a digest of its bytes or link target."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "dir"
    return entries


def _assert_one_line_error(result, pattern: str) -> str:  # noqa: ANN001
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()  # the progress bar is hidden off a terminal
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: ") and "Traceback" not in result.output
    assert "internal error" not in line, line
    import re

    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    return line


# -- the broken inputs -----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The files of one case: ``model`` and ``data`` (or ``state``) in ``in/``; extra CLI arguments."""

    model: Path
    data: Path | None = None
    state: Path | None = None
    args: tuple[str, ...] = ()


def _npz(folder: Path, **arrays: np.ndarray) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **arrays)
    return path


def _tiny(folder: Path, model: onnx.ModelProto | None = None) -> Path:
    path = folder / "model.onnx"
    onnx.save(model if model is not None else tiny_cnn(), path)
    return path


def _bytes_model(content: bytes) -> Callable[[Path], Inputs]:
    def make(folder: Path) -> Inputs:
        path = folder / "model.onnx"
        path.write_bytes(content)
        return Inputs(path, _npz(folder, **tiny_data(8)))

    return make


def _checker_failure(folder: Path) -> Inputs:
    model = tiny_cnn()
    model.graph.node[1].input[0] = "does_not_exist"
    return Inputs(_tiny(folder, model), _npz(folder, **tiny_data(8)))


def _duplicate_tensor(folder: Path) -> Inputs:
    """Two nodes writing the same tensor: not SSA, refused by the checker."""
    model = tiny_cnn()
    model.graph.node.insert(1, helper.make_node("Identity", ["x"], ["c1"], name="dup"))
    return Inputs(_tiny(folder, model), _npz(folder, **tiny_data(8)))


def _duplicate_initializer(folder: Path) -> Inputs:
    model = tiny_cnn()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "b1"))
    return Inputs(_tiny(folder, model), _npz(folder, **tiny_data(8)))


def _external(location: str | None = None, dims: list[int] | None = None) -> Callable[[Path], Inputs]:
    """The 4 MB external-data CNN with its 'w2' reference redirected, or declaring a huge shape."""

    def make(folder: Path) -> Inputs:
        secret = folder.parent / "secret.bin"
        secret.write_bytes(np.ones(1 << 22, np.uint8).tobytes())
        (folder / "link.bin").symlink_to(secret)
        path = _save_external(external_cnn(), folder / "model.onnx")
        model = onnx.load(str(path), load_external_data=False)
        w2 = next(t for t in model.graph.initializer if t.name == "w2")
        entries = {e.key: e for e in w2.external_data}
        if location is not None:
            entries["location"].value = location
            entries["offset"].value = "0"
        if dims is not None:
            del w2.dims[:]
            w2.dims.extend(dims)
            del w2.external_data[:]  # no length: only the shape claims the size
            w2.external_data.add(key="location", value="weights.bin")
        onnx.save(model, path)
        return Inputs(path, _npz(folder, **external_data_feeds(8)))

    return make


MODEL_CASES = {
    "empty-file": (_bytes_model(b""), r"model\.onnx: the file is empty"),
    "truncated-protobuf": (_bytes_model(tiny_cnn().SerializeToString()[:57]), r"model\.onnx: not an ONNX model"),
    "not-onnx": (_bytes_model(b"PK\x03\x04 this is a zip, not a model \xff\xfe" * 8), r"model\.onnx: not an ONNX model"),
    "json-not-onnx": (_bytes_model(json.dumps({"graph": "no"}).encode()), r"model\.onnx: not an ONNX model"),
    "fails-checker": (_checker_failure, r"model\.onnx: fails onnx\.checker: .*does_not_exist"),
    "duplicate-tensor": (_duplicate_tensor, r"model\.onnx: fails onnx\.checker: .*'c1'"),
    "duplicate-initializer": (_duplicate_initializer, r"model\.onnx: fails onnx\.checker: .*b1"),
    "external-absolute": (_external("/etc/passwd"), r"model\.onnx: tensor 'w2': .*'/etc/passwd' is an absolute path"),
    "external-dotdot": (_external("../secret.bin"), r"model\.onnx: tensor 'w2': .*'\.\./secret\.bin' has a '\.\.' component"),
    "external-symlink": (_external("link.bin"), r"model\.onnx: tensor 'w2': .*'link\.bin' resolves to .* through a symlink"),
    "external-huge-dims": (
        _external(dims=[1_000_000, 1_000_000]), r"model\.onnx: tensor 'w2': .*backs a tensor of shape \[1000000, 1000000\]"
    ),
}


def _data_case(**arrays: np.ndarray) -> Callable[[Path], Inputs]:
    def make(folder: Path) -> Inputs:
        return Inputs(_tiny(folder), _npz(folder, **arrays))

    return make


def _with(n: int, index: tuple, value: float) -> np.ndarray:
    x = tiny_data(n)["x"]
    x[index] = value
    return x


def _truncated_npz(folder: Path) -> Inputs:
    path = _npz(folder, **tiny_data(8))
    path.write_bytes(path.read_bytes()[:100])
    return Inputs(_tiny(folder), path)


def _reader_fails_midway(folder: Path) -> Inputs:
    """Sample folders of .pb tensors (ONNX's test-data layout) of which the third is corrupt."""
    samples = folder / "samples"
    x = tiny_data(4)["x"]
    for i in range(4):
        (samples / f"test_data_set_{i}").mkdir(parents=True)
        blob = numpy_helper.from_array(x[i : i + 1], "x").SerializeToString()
        (samples / f"test_data_set_{i}" / "input_0.pb").write_bytes(blob[: len(blob) // 2] if i == 2 else blob)
    return Inputs(_tiny(folder), samples, args=("--batch-size", "1"))


DATA_CASES = {
    "nan": (_data_case(x=_with(32, (20, 0, 0, 0), np.nan)), r"calib\.npz: calibration batch 1: input 'x' contains 1 NaN or Inf value\(s\) \(first in sample 20\)"),
    "inf": (_data_case(x=_with(32, (3, 1, 2, 2), -np.inf)), r"calib\.npz: calibration batch 0: input 'x' contains 1 NaN or Inf value\(s\) \(first in sample 3\)"),
    "wrong-rank": (_data_case(x=np.zeros((4, 3, 8), np.float32)), r"calib\.npz: .*input 'x' has shape \(4, 3, 8\), the model expects rank 4"),
    "wrong-dtype": (_data_case(x=np.zeros((4, 3, 8, 8), np.float64)), r"calib\.npz: .*input 'x' has dtype float64"),
    "wrong-name": (_data_case(y=np.zeros((4, 3, 8, 8), np.float32)), r"calib\.npz: missing input\(s\) \['x'\]"),
    "zero-samples": (_data_case(x=np.zeros((0, 3, 8, 8), np.float32)), r"calib\.npz.* holds no samples"),
    "truncated-npz": (_truncated_npz, r"calib\.npz: cannot read as \.npz"),
    "reader-fails-midway": (_reader_fails_midway, r"test_data_set_2.input_0\.pb: not an ONNX TensorProto"),
}


def _state_case(content: Callable[[Path], str]) -> Callable[[Path], Inputs]:
    def make(folder: Path) -> Inputs:
        state = folder / "state.json"
        state.write_text(content(folder))
        return Inputs(_tiny(folder), state=state)

    return make


def _state_of_another_model(folder: Path) -> str:
    state = ortq.Toolkit(autoload=False).calibrate(tiny_cnn(seed=7), tiny_data(8))
    return json.dumps(state.to_dict())


def _truncated_state(folder: Path) -> str:
    state = ortq.Toolkit(autoload=False).calibrate(tiny_cnn(), tiny_data(8))
    return json.dumps(state.to_dict())[:200]


STATE_CASES = {
    "state-not-json": (_state_case(lambda _: "{not json"), r"state\.json: not a calibration state \(not JSON"),
    "state-truncated": (_state_case(_truncated_state), r"state\.json: not a calibration state \(not JSON"),
    "state-wrong-format": (_state_case(lambda _: json.dumps({"format": "other"})), r"state\.json: not an ortq calibration state"),
    "state-malformed": (
        _state_case(lambda _: json.dumps({"format": "ortq.calibration-state", "version": 1, "statistics": {"c1": 3}})),
        r"state\.json: malformed calibration state",
    ),
    "state-of-another-model": (
        _state_case(_state_of_another_model), r"model\.onnx: the calibration state was computed for a different model"
    ),
}


def _prepare(tmp_path: Path, make: Callable[[Path], Inputs]) -> tuple[Inputs, Path, Path]:
    inputs_dir, out_dir = tmp_path / "in", tmp_path / "out"
    inputs_dir.mkdir()
    out_dir.mkdir()
    (out_dir / "previous.onnx").write_bytes(b"an earlier result that must survive")
    return make(inputs_dir), inputs_dir, out_dir


def _command(kind: str, inputs: Inputs, out_dir: Path) -> list[str]:
    data = ["-d", str(inputs.data)] if inputs.data is not None else ["-s", str(inputs.state)]
    if kind == "quantize":
        return ["quantize", str(inputs.model), "-o", str(out_dir / "q.onnx"), *data, *inputs.args]
    if kind == "previous":  # overwriting an existing output: it must survive the failure
        return ["quantize", str(inputs.model), "-o", str(out_dir / "previous.onnx"), *data, *inputs.args]
    if kind == "dynamic":
        return ["quantize", str(inputs.model), "-o", str(out_dir / "q.onnx"), "--mode", "dynamic", *data, *inputs.args]
    if kind == "calibrate":
        return ["calibrate", str(inputs.model), "-o", str(out_dir / "state.json"), *data, *inputs.args]
    if kind == "export":
        return ["export", "cpu", str(inputs.model), "-o", str(out_dir), *data, *inputs.args]
    if kind == "info":
        return ["info", str(inputs.model)]
    raise AssertionError(kind)


def _fails_cleanly(tmp_path: Path, make: Callable[[Path], Inputs], kind: str, pattern: str,
                   toolkit: ortq.Toolkit | None = None) -> str:
    inputs, inputs_dir, out_dir = _prepare(tmp_path, make)
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    result = CliRunner().invoke(build_cli(toolkit or ortq.Toolkit(autoload=False)), _command(kind, inputs, out_dir))
    line = _assert_one_line_error(result, pattern)
    assert _snapshot(out_dir) == before_out, "the output folder changed"
    assert _snapshot(inputs_dir) == before_in, "an input file changed"
    return line


@pytest.mark.parametrize("kind", ["quantize", "dynamic", "calibrate", "export", "previous", "info"])
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_broken_model_files(tmp_path: Path, case: str, kind: str) -> None:
    make, pattern = MODEL_CASES[case]
    line = _fails_cleanly(tmp_path, make, kind, pattern)
    assert str(tmp_path / "in" / "model.onnx") in line


@pytest.mark.parametrize("kind", ["quantize", "calibrate", "export"])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_broken_calibration_data(tmp_path: Path, case: str, kind: str) -> None:
    make, pattern = DATA_CASES[case]
    _fails_cleanly(tmp_path, make, kind, pattern)


def test_broken_verification_data_in_dynamic_mode(tmp_path: Path) -> None:
    make, pattern = DATA_CASES["nan"]
    _fails_cleanly(tmp_path, make, "dynamic", pattern)


@pytest.mark.parametrize("kind", ["quantize", "previous", "export"])
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_broken_calibration_states(tmp_path: Path, case: str, kind: str) -> None:
    make, pattern = STATE_CASES[case]
    _fails_cleanly(tmp_path, make, kind, pattern)


@pytest.mark.parametrize("case", ["state-not-json", "state-of-another-model"])
def test_broken_states_are_not_merged(tmp_path: Path, case: str) -> None:
    make, _ = STATE_CASES[case]
    inputs, inputs_dir, out_dir = _prepare(tmp_path, make)
    good = inputs_dir / "good.json"
    ortq.Toolkit(autoload=False).calibrate(tiny_cnn(), tiny_data(8)).save(good)
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    args = ["merge-states", str(good), str(inputs.state), "-o", str(out_dir / "merged.json")]
    pattern = r"state\.json: not a calibration state" if case == "state-not-json" else "different models"
    _assert_one_line_error(CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), args), pattern)
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in


# -- plugins that raise ----------------------------------------------------------------------------------------


class _RaisingAtRegistration:
    @ortq.hookimpl
    def ortq_register_calibrators(self, register):  # noqa: ANN001, ANN201
        raise RuntimeError("registration exploded")


class _ExplodingRelu(ortq.OpQuantizer):
    op_types = ("Relu",)

    def plan(self, node, ctx):  # noqa: ANN001, ANN201
        raise ZeroDivisionError("plan exploded")


class _RaisingAtQuantization:
    @ortq.hookimpl
    def ortq_register_op_quantizers(self, register):  # noqa: ANN001, ANN201
        register(_ExplodingRelu, replace=True)


class _ExplodingBackend(CpuBackend):
    name = "explodes"
    description = "a target whose export raises"

    def export(self, result, out_dir):  # noqa: ANN001, ANN201
        raise OSError("export exploded")


class _RaisingAtExport:
    @ortq.hookimpl
    def ortq_register_backends(self, register):  # noqa: ANN001, ANN201
        register(_ExplodingBackend)


def test_plugin_raising_at_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The toolkit is built before the command group exists: ``ortq.api.cli.main`` reports it."""
    from ortq.api import cli

    monkeypatch.setattr(cli, "_toolkit_from_environment",
                        lambda *_: ortq.Toolkit([_RaisingAtRegistration()], autoload=False))
    inputs, inputs_dir, out_dir = _prepare(tmp_path, _data_case(**tiny_data(8)))
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    with pytest.raises(SystemExit) as info:
        cli.main(_command("quantize", inputs, out_dir))
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: plugin "), lines
    assert "raised in ortq_register_calibrators" in lines[0] and "registration exploded" in lines[0]
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in


@pytest.mark.parametrize("kind", ["quantize", "previous", "calibrate", "export"])
def test_plugin_raising_at_quantization(tmp_path: Path, kind: str) -> None:
    toolkit = ortq.Toolkit([_RaisingAtQuantization()], autoload=False)
    line = _fails_cleanly(tmp_path, _data_case(**tiny_data(8)), kind, r"_ExplodingRelu.*'relu' \(Relu\).*plan exploded",
                          toolkit)
    assert "test_cli_hostile" in line  # the plugin is named


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_plugin_raising_at_export(tmp_path: Path, command: str) -> None:
    toolkit = ortq.Toolkit([_RaisingAtExport()], autoload=False)
    inputs, inputs_dir, out_dir = _prepare(tmp_path, _data_case(**tiny_data(8)))
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    if command == "quantize":
        args = ["quantize", str(inputs.model), "-o", str(out_dir / "previous.onnx"), "-d", str(inputs.data), "-t", "explodes"]
    else:
        args = ["export", "explodes", str(inputs.model), "-o", str(out_dir), "-d", str(inputs.data)]
    result = CliRunner().invoke(build_cli(toolkit), args)
    _assert_one_line_error(result, r"backend 'explodes' failed to export: OSError\('export exploded'\)")
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in


# -- unusual but valid models: they must quantize ------------------------------------------------------------


def _unknown_domain_op() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["c1"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [_x()], [_out("y", ["N", 4, 8, 8])], [_conv_w("w1", 1), _conv_w("w2", 2)],
                  extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def _unknown_shapes() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c1"], ["s"], name="shape"),
        helper.make_node("Reshape", ["c1", "s"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [_x(("N", 4, "H", "W"))], [_out("y", ["N", "C", "H2", "W2"])], [_conv_w("w1", 1), _conv_w("w2", 2)])


def _shadowing_initializer() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "k"], ["y"], name="add"),
    ]
    k = numpy_helper.from_array(np.full((1, 4, 1, 1), 0.5, np.float32), "k")
    inputs = [_x(), helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 4, 1, 1])]
    return _model(nodes, inputs, [_out("y", ["N", 4, 8, 8])], [_conv_w("w1", 1), k])


def _duplicate_node_names() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [_x()], [_out("y", ["N", 4, 8, 8])], [_conv_w("w1", 1), _conv_w("w2", 2)])


def _with_data(build: Callable[[], onnx.ModelProto]) -> Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    return lambda: (build(), _data())


VALID_CASES = {
    "opset7": _with_data(lambda: _opset7_cnn(ir=4)),
    "opset7-ir3": _with_data(lambda: _opset7_cnn(ir=3)),
    "opset9": lambda: opset9_conv_relu()[:2],
    "subgraphs-if-loop-scan": _with_data(_subgraph_model),
    "unknown-domain-op": _with_data(_unknown_domain_op),
    "unknown-shapes": _with_data(_unknown_shapes),
    "initializer-shadowing-input": _with_data(_shadowing_initializer),
    "duplicate-node-names": _with_data(_duplicate_node_names),
}
#: Integer ops that show a node was quantized, per mode (dynamic mode is asked to take Conv too).
QUANTIZED_OPS = {"static": {"QuantizeLinear"}, "dynamic": {"ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("case", sorted(VALID_CASES))
def test_unusual_valid_models_quantize(tmp_path: Path, case: str, mode: str) -> None:
    model, feeds = VALID_CASES[case]()
    inputs_dir, out_dir = tmp_path / "in", tmp_path / "out"
    inputs_dir.mkdir()
    out_dir.mkdir()
    path = _tiny(inputs_dir, model)
    data = _npz(inputs_dir, **feeds)
    before = _snapshot(inputs_dir)
    out = out_dir / "q.onnx"
    args = ["quantize", str(path), "-o", str(out), "-d", str(data)]
    if mode == "dynamic":
        args += ["--mode", "dynamic", "--op-types", "Conv,Gemm,MatMul"]
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert _snapshot(inputs_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    quantized = onnx.load(str(out))
    assert {n.op_type for n in quantized.graph.node} & QUANTIZED_OPS[mode], "nothing was quantized"
    if case == "duplicate-node-names":  # ONNX Runtime refuses the float original: compare with a renamed copy
        for i, node in enumerate(model.graph.node):
            node.name = f"n{i}"
    for ref, act in zip(run(model, feeds), run(out, feeds)):
        assert sqnr_db(ref, act) >= FLOOR_DB


# -- the real process: nothing but the error line reaches stderr ---------------------------------------------


@pytest.mark.subprocess
def test_real_process_stderr_is_one_line(tmp_path: Path) -> None:
    """Logging, progress output and warnings issued before the failure must not reach stderr either."""
    env = {**os.environ, "ORTQ_DISABLE_PLUGIN_AUTOLOAD": "1"}
    inputs, inputs_dir, out_dir = _prepare(tmp_path, DATA_CASES["nan"][0])
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    done = subprocess.run([sys.executable, "-m", "ortq", *_command("quantize", inputs, out_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "contains 1 NaN" in lines[0], done.stderr
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in
