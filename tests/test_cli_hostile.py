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


def _missing_model(folder: Path) -> Inputs:
    return Inputs(folder / "model.onnx", _npz(folder, **tiny_data(8)))


MODEL_CASES = {
    "missing-file": (_missing_model, r"model\.onnx: no such model file"),
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


# -- an output that is one of the inputs: refused before any work, every input byte-identical -----------------


def _overwrite_case(folder: Path) -> dict[str, Path]:
    """The files a command may read: a model, its hard link, calibration data (a file and a folder), a state,
    overrides, labels, and a model with external data."""
    model = _tiny(folder)
    files = {"model": model, "data": _npz(folder, **tiny_data(8))}
    (folder / "sub").mkdir()
    os.link(model, folder / "hard.onnx")
    (folder / "link.onnx").symlink_to(model)
    samples = folder / "samples"
    samples.mkdir()
    np.save(samples / "x.npy", tiny_data(8)["x"])
    ortq.Toolkit(autoload=False).calibrate(tiny_cnn(), tiny_data(8)).save(folder / "state.json")
    (folder / "overrides.json").write_text(json.dumps({"r1": [{"rmin": 0.0, "rmax": 4.0}]}))
    np.save(folder / "labels.npy", np.zeros(8, np.int64))
    _save_external(external_cnn(), folder / "ext.onnx")
    np.savez(folder / "ext.npz", **external_data_feeds(4))
    return files


def _i(name: str) -> str:
    return "{in}/" + name


#: command line (``{in}`` is the inputs folder) -> what the error names as the input it refused to overwrite
OVERWRITE_CASES = {
    "quantize-o-model": (["quantize", _i("model.onnx"), "-o", _i("model.onnx"), "-d", _i("calib.npz")], "model"),
    "quantize-o-dotdot": (["quantize", _i("model.onnx"), "-o", _i("sub/../model.onnx"), "-d", _i("calib.npz")], "model"),
    "quantize-o-symlink": (["quantize", _i("model.onnx"), "-o", _i("link.onnx"), "-d", _i("calib.npz")], "model"),
    "quantize-o-hardlink": (["quantize", _i("model.onnx"), "-o", _i("hard.onnx"), "-d", _i("calib.npz")], "model"),
    "quantize-o-data": (["quantize", _i("model.onnx"), "-o", _i("calib.npz"), "-d", _i("calib.npz")], "calibration data"),
    "quantize-o-file-in-data-folder": (
        ["quantize", _i("model.onnx"), "-o", _i("samples/x.npy"), "-d", _i("samples")], "calibration data"),
    "quantize-o-state": (["quantize", _i("model.onnx"), "-o", _i("state.json"), "-s", _i("state.json")], "calibration state"),
    "quantize-o-overrides": (["quantize", _i("model.onnx"), "-o", _i("overrides.json"), "-d", _i("calib.npz"),
                              "--tensor-overrides", _i("overrides.json")], "tensor overrides"),
    "quantize-o-external-data": (["quantize", _i("ext.onnx"), "-o", _i("weights.bin"), "-d", _i("ext.npz")], "external data"),
    "quantize-min-sqnr-o-labels": (["quantize", _i("model.onnx"), "-o", _i("labels.npy"), "-d", _i("calib.npz"),
                                    "--max-drop", "1", "--metric", "accuracy", "--labels", _i("labels.npy")], "labels"),
    "dynamic-o-model": (["quantize", _i("model.onnx"), "-o", _i("model.onnx"), "--mode", "dynamic"], "model"),
    "calibrate-o-model": (["calibrate", _i("model.onnx"), "-d", _i("calib.npz"), "-o", _i("model.onnx")], "model"),
    "calibrate-o-merged-state": (["calibrate", _i("model.onnx"), "-d", _i("calib.npz"), "-o", _i("state.json"),
                                  "--merge", _i("state.json")], "state"),
    "merge-states-o-state": (["merge-states", _i("state.json"), _i("state.json"), "-o", _i("state.json")], "state"),
    "debug-html-model": (["debug", _i("model.onnx"), _i("hard.onnx"), "-d", _i("calib.npz"), "--html", _i("model.onnx")],
                         "float model"),
    "debug-json-data": (["debug", _i("model.onnx"), _i("hard.onnx"), "-d", _i("calib.npz"), "--json", _i("calib.npz")],
                        "data"),
    "evaluate-json-labels": (["evaluate", _i("model.onnx"), _i("hard.onnx"), "-d", _i("calib.npz"), "--labels",
                              _i("labels.npy"), "--json", _i("labels.npy")], "labels"),
    "preprocess-o-hardlink": (["preprocess", _i("model.onnx"), "-o", _i("hard.onnx")], "model"),
    "qat-o-model": (["qat", _i("model.onnx"), "-o", _i("model.onnx")], "model"),
}


@pytest.mark.parametrize("case", sorted(OVERWRITE_CASES))
def test_an_output_that_is_an_input_is_refused(tmp_path: Path, case: str) -> None:
    args, role = OVERWRITE_CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    _overwrite_case(folder)
    before = _snapshot(folder)
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)),
                                [a.replace("{in}", str(folder)) for a in args])
    line = _assert_one_line_error(result, r"is (the input|.*a file of the input) " + role)
    assert "never overwrites a file it reads" in line
    assert _snapshot(folder) == before, "an input file changed"


def test_python_api_and_compat_refuse_an_output_that_is_the_input(tmp_path: Path) -> None:
    from ortq.api.compat import quantize_static

    model = _tiny(tmp_path)
    before = model.read_bytes()

    class Reader:
        def __init__(self) -> None:
            self._batches = iter([{"x": x[None]} for x in tiny_data(4)["x"]])

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    with pytest.raises(ortq.ModelError, match="is the input model"):
        quantize_static(model, model, Reader())
    with pytest.raises(ortq.ModelError, match="is the input model"):
        ortq.Toolkit(autoload=False).quantize(model, tmp_path / "." / "model.onnx", calibration_data=tiny_data(8))
    with pytest.raises(ortq.ModelError, match="is the input model"):
        ortq.Toolkit(autoload=False).quantize_dynamic(str(model), model)
    assert model.read_bytes() == before


# -- Ctrl-C in the middle of calibration: a real SIGINT to a real process ------------------------------------

_INTERRUPTED = r"""
import sys
from pathlib import Path

from ortq.custom_ops import observers

marker, mode, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
observe = observers.ObserverSink.observe


def observe_and_mark(self, index, values):  # the observers run: calibration is under way
    if not marker.exists():
        marker.write_text("started")
    return observe(self, index, values)


observers.ObserverSink.observe = observe_and_mark
if mode == "cli":
    from ortq.api.cli import main

    main(argv)
else:
    import ortq

    try:
        ortq.Toolkit(autoload=False).quantize(argv[0], argv[1], calibration_data=argv[2], batch_size=1)
    except KeyboardInterrupt:
        print("caught KeyboardInterrupt")
"""


def _slow_calibration(folder: Path) -> tuple[Path, Path]:
    """A 12-conv model and 2000 single-sample batches: seconds of calibration, interrupted far before the end."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(12):
        inits.append(numpy_helper.from_array((rng.standard_normal((8, 8 if i else 3, 3, 3)) * 0.3).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 8, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, folder / "slow.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((2000, 3, 16, 16)).astype(np.float32))
    return folder / "slow.onnx", folder / "calib.npz"


def _interrupt(tmp_path: Path, mode: str, args: list[str]) -> subprocess.CompletedProcess:
    import signal
    import time

    marker = tmp_path / "started"
    env = {**os.environ, "ORTQ_DISABLE_PLUGIN_AUTOLOAD": "1"}
    child = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(marker), mode, *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "calibration never started"
    time.sleep(0.2)  # well inside the observed session's runs
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_ctrl_c_during_calibration_aborts_cleanly(tmp_path: Path, command: str) -> None:
    """Before: SIGABRT (exit 134, pybind11::error_already_set) from inside onnxruntime-extensions' op wrapper."""
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    (out_dir / "previous.onnx").write_bytes(b"an earlier result that must survive")
    model, data = _slow_calibration(inputs)
    before_in, before_out = _snapshot(inputs), _snapshot(out_dir)
    output = out_dir / ("previous.onnx" if command == "quantize" else "state.json")
    done = _interrupt(tmp_path, "cli", [command, str(model), "-d", str(data), "-o", str(output), "--batch-size", "1"])
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip() == "Aborted!", done.stderr[-2000:]
    assert _snapshot(out_dir) == before_out and _snapshot(inputs) == before_in


@pytest.mark.subprocess
def test_ctrl_c_during_calibration_is_a_catchable_keyboard_interrupt(tmp_path: Path) -> None:
    model, data = _slow_calibration(tmp_path)
    done = _interrupt(tmp_path, "api", [str(model), str(tmp_path / "q.onnx"), str(data)])
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "caught KeyboardInterrupt"
    assert not (tmp_path / "q.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


# -- a third-party plugin that raises at import --------------------------------------------------------------


def _broken_distribution(folder: Path) -> None:
    """An installed distribution whose ``ortq`` entry point raises when imported."""
    dist = folder / "broken_demo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ortq]\nbroken_demo = broken_demo_plugin\n")
    (folder / "broken_demo_plugin.py").write_text('raise RuntimeError("this plugin is broken")\n')


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("ORTQ_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("ORTQ_PLUGINS", "broken_demo")  # whatever else is installed stays out of the test


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ortq.api.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


@pytest.mark.usefixtures("broken_plugin")
def test_a_broken_plugin_is_listed_by_help_plugins_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = "plugin 'broken_demo' (entry point broken_demo_plugin from broken-demo 1.0) failed to load: " \
            "RuntimeError('this plugin is broken')"
    code, out, err = _main(["--help"], capsys)
    assert code == 0 and "broken_demo" in out and "this plugin is broken" in out and "--no-plugin" in out, out + err
    code, out, err = _main(["plugins"], capsys)
    assert code == 0 and f"  error: {error}" in out and "targets: cpu" in out, out + err
    model = _tiny(tmp_path)
    code, out, err = _main(["info", str(model)], capsys)
    assert code == 0 and error in out and "target cpu:" in out, out + err


@pytest.mark.usefixtures("broken_plugin")
def test_commands_work_around_a_broken_plugin_and_say_so_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = _tiny(tmp_path), _npz(tmp_path, **tiny_data(8))
    code, out, err = _main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "-d", str(data)], capsys)
    assert code == 0 and (tmp_path / "q.onnx").is_file(), out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "broken_demo" in lines[0] and "--no-plugin broken_demo" in lines[0]
    assert "ORTQ_DISABLE_PLUGIN_AUTOLOAD=1" in lines[0]
    code, out, err = _main(["--no-plugin", "broken_demo", "quantize", str(model), "-o", str(tmp_path / "q2.onnx"),
                            "-d", str(data)], capsys)
    assert code == 0 and err == "", err
    code, out, err = _main(["--no-plugin", "broken_demo", "plugins"], capsys)
    assert code == 0 and "broken_demo" not in out


@pytest.mark.usefixtures("broken_plugin")
def test_the_python_api_still_raises_on_a_broken_plugin() -> None:
    with pytest.raises(ortq.PluginError, match="broken_demo.*this plugin is broken"):
        ortq.Toolkit()
    assert "broken_demo" in ortq.Toolkit(on_plugin_error="skip").plugin_info


# -- output a person can read --------------------------------------------------------------------------------


def _bias_overflow_model(branches: int = 4) -> onnx.ModelProto:
    """Parallel Convs with tiny weights and large biases: each bias overflows int32 at its weight's scale."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(branches):
        inits.append(numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 1e-4).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.full(4, 1000.0 * (i + 1), np.float32), f"b{i}"))
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        outs.append(helper.make_tensor_value_info(f"c{i}", TensorProto.FLOAT, ["N", 4, 8, 8]))
    graph = helper.make_graph(nodes, "bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_repeated_warnings_are_one_line_with_the_worst_case(tmp_path: Path) -> None:
    """Before: one WARNING line per bias (26 on a real EfficientNet-class CNN)."""
    model, data = _tiny(tmp_path, _bias_overflow_model()), _npz(tmp_path, **tiny_data(8))
    cli = build_cli(ortq.Toolkit(autoload=False))
    result = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "-d", str(data)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "bias 'b3' would overflow int32" in lines[0], lines[0]  # b3, the largest bias, widens most
    assert lines[0].endswith("[the worst of 4 alike; -v lists them all]")
    verbose = CliRunner().invoke(cli, ["-v", "quantize", str(model), "-o", str(tmp_path / "q.onnx"), "-d", str(data)])
    assert verbose.exit_code == 0
    each = [line for line in verbose.stderr.splitlines() if "would overflow int32" in line]
    assert sorted(line.split("'")[1] for line in each) == ["b0", "b1", "b2", "b3"]
    widest = max(each, key=lambda line: float(line.rsplit("up to ", 1)[1].rstrip("x")))
    assert lines[0].startswith(widest), (lines[0], widest)


def test_verification_reports_progress(tmp_path: Path) -> None:
    seen: dict[str, int] = {"calibrating": 0, "verifying": 0}
    ortq.Toolkit(autoload=False).quantize(
        tiny_cnn(), calibration_data=tiny_data(32), batch_size=8, verify_samples=16,
        progress=lambda n: seen.__setitem__("calibrating", seen["calibrating"] + n),
        verify_progress=lambda n: seen.__setitem__("verifying", seen["verifying"] + n),
    )
    assert seen == {"calibrating": 32, "verifying": 16}


def _many_float_transposes(branches: int = 5) -> onnx.ModelProto:
    """Transposes after an op nobody quantizes: each stays float for a reason naming its own input."""
    nodes, outs = [], []
    for i in range(branches):
        nodes.append(helper.make_node("Sin", ["x"], [f"s{i}"], name=f"sin{i}"))
        nodes.append(helper.make_node("Transpose", [f"s{i}"], [f"t{i}"], name=f"transpose{i}", perm=[0, 1, 3, 2]))
        outs.append(helper.make_tensor_value_info(f"t{i}", TensorProto.FLOAT, ["N", 3, 8, 8]))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_info_groups_float_reasons_by_kind(tmp_path: Path) -> None:
    """Before: one line per Transpose, because each reason names a different tensor."""
    model = _tiny(tmp_path, _many_float_transposes())
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), ["info", str(model)])
    assert result.exit_code == 0, result.output
    transposes = [line for line in result.stdout.splitlines() if "float Transpose" in line]
    assert transposes == ["  float Transpose x5: its input '...' is not quantized, so moving it in 8 bits gains "
                          "nothing [transpose0, transpose1, transpose2 (+2 more)]"], result.stdout


def test_the_moving_it_reason_says_the_real_bit_width() -> None:
    plan, _, _ = ortq.Toolkit(autoload=False).plan(_many_float_transposes(1), activation_type="int16")
    (reason,) = [f.reason for f in plan.float_nodes if f.op_type == "Transpose"]
    assert "moving it in 16 bits gains nothing" in reason


@pytest.mark.subprocess
def test_a_closed_stdout_pipe_is_a_quiet_exit(tmp_path: Path) -> None:
    """``ortq info m.onnx | head -3``. Before: 'Error: internal error (BrokenPipeError)' and exit 1."""
    model = _tiny(tmp_path, _many_float_transposes(40))
    env = {**os.environ, "ORTQ_DISABLE_PLUGIN_AUTOLOAD": "1"}
    child = subprocess.Popen([sys.executable, "-m", "ortq", "info", "--all-nodes", str(model)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first line
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0, err
    assert err == ""


def test_size_line_says_larger_when_the_model_grows(tmp_path: Path) -> None:
    """Before: '0.002 MB -> 0.004 MB (0.62x smaller)'."""
    from ortq.core.report import size_change

    assert (size_change(4000, 1000), size_change(1000, 1600), size_change(5, 5)) == \
        ("4.00x smaller", "1.60x larger", "same size")
    model, data = _tiny(tmp_path, _bias_overflow_model()), _npz(tmp_path, **tiny_data(8))
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)),
                                ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "-d", str(data)])
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("size: ")]
    assert line.endswith("x larger)"), line  # 8 tiny weights gain Q/DQ nodes and scales


# -- errors in the user's words ------------------------------------------------------------------------------

STATE_CASES["state-missing-field"] = (
    _state_case(lambda _: json.dumps({"format": "ortq.calibration-state", "version": 1,
                                      "model": {"fingerprint": "0"}, "calibrator": "minmax"})),
    r"state\.json: malformed calibration state: the file has no 'statistics' field",
)
STATE_CASES["state-statistic-missing-field"] = (
    _state_case(lambda _: json.dumps({"format": "ortq.calibration-state", "version": 1, "model": {"fingerprint": "0"},
                                      "calibrator": "minmax", "statistics": {"r1": {"kind": "minmax"}}})),
    r"state\.json: malformed calibration state: the 'minmax' statistics of tensor 'r1' have no 'min' field",
)


@pytest.mark.parametrize("case", ["state-missing-field", "state-statistic-missing-field"])
def test_state_missing_a_field_names_it(tmp_path: Path, case: str) -> None:
    """Before: 'malformed calibration state (KeyError: 'statistics')'."""
    make, pattern = STATE_CASES[case]
    _fails_cleanly(tmp_path, make, "quantize", pattern)


@pytest.mark.parametrize("target, listed", [("cpu", "reduce_range='auto'"), ("esp32s3", "bits=8, model_name=None")])
def test_unknown_backend_option_lists_the_valid_ones(tmp_path: Path, target: str, listed: str) -> None:
    """Before: '__init__() got an unexpected keyword argument 'bogus''."""
    inputs, inputs_dir, out_dir = _prepare(tmp_path, _data_case(**tiny_data(8)))
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    args = [*_command("quantize", inputs, out_dir), "-t", target, "--backend-option", "bogus=1"]
    line = _assert_one_line_error(CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), args),
                                  rf"backend '{target}' has no option 'bogus'; its options: ")
    assert listed in line
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in
    shown = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), ["export", target, "--help"])
    assert shown.exit_code == 0 and "Options (default):" in shown.stdout


def test_usage_errors_exit_2_as_documented(tmp_path: Path) -> None:
    """click's convention, documented in docs/hostile-inputs.md: usage errors exit 2 with the usage line."""
    model = _tiny(tmp_path)
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), ["quantize", str(model), "--bogus"])
    assert result.exit_code == 2
    assert "Usage: " in result.stderr and "Error: No such option '--bogus'" in result.stderr
    docs = (Path(__file__).resolve().parents[1] / "docs" / "hostile-inputs.md").read_text()
    assert "exit status 2" in docs


def _sigmoid_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "sig", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_export_refuses_an_unsupported_model_before_calibrating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the whole model was calibrated, verified (with a low-SQNR warning), then refused."""
    import ortq.pipeline.run as run_module

    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran before the target refused the model")

    monkeypatch.setattr(run_module, "run_calibration", no_calibration)
    model, data = _tiny(tmp_path, _sigmoid_cnn()), _npz(tmp_path, **tiny_data(8))
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)),
                                ["export", "esp32s3", str(model), "-o", str(tmp_path / "out"), "-d", str(data)])
    _assert_one_line_error(result, r"node 'sigmoid' \(Sigmoid\) cannot run on esp32s3")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["quantize", "dynamic", "calibrate"])
def test_output_folder_missing_fails_before_any_work(tmp_path: Path, kind: str) -> None:
    inputs, inputs_dir, out_dir = _prepare(tmp_path, _data_case(**tiny_data(8)))
    before_in, before_out = _snapshot(inputs_dir), _snapshot(out_dir)
    args = _command(kind, inputs, out_dir / "missing")
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), args)
    _assert_one_line_error(result, r"output folder '.*missing' does not exist")
    assert _snapshot(out_dir) == before_out and _snapshot(inputs_dir) == before_in
