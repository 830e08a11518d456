"""Models with external data: untrusted locations refused, large models read and written in two files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.io import external_data, model_io
from ortq.core.error_measures import sqnr_db


def _cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(1024x1024) -> Relu -> Gemm: about 4.2 MB of weights."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((1024, 1024)) / 32).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(1024) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.standard_normal((10, 1024)) / 32).astype(np.float32), "w3"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["g2"], name="fc1", transB=1),
        helper.make_node("Relu", ["g2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "ext_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _data(n: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(path_or_model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def ext_model(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return _save_external(_cnn(), folder / "model.onnx")


@pytest.fixture
def toolkit() -> ortq.Toolkit:
    return ortq.Toolkit(autoload=False)


def test_external_in_external_out(tmp_path: Path, ext_model: Path, toolkit: ortq.Toolkit) -> None:
    before = _digest(ext_model.parent)
    out = tmp_path / "q.onnx"
    result = toolkit.quantize(ext_model, out, calibration_data=_data())
    assert _digest(ext_model.parent) == before  # the input files are untouched
    data = out.with_name("q.onnx.data")
    assert data.is_file() and out.stat().st_size < 64 * 1024 < data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.onnx", "q.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(str(out))  # with its external data
    assert all(not external_data.uses_external(t) for t in loaded.graph.initializer)
    x = _data(16, seed=7)["x"]
    assert sqnr_db(_run(ext_model, x), _run(out, x)) > 30
    # result.model is whole (its weights are back in memory after the split write)
    assert not any(external_data.uses_external(t) for t in result.model.graph.initializer)
    np.testing.assert_allclose(_run(result.model, x), _run(out, x), rtol=0, atol=0)


def test_inline_input_small_output_stays_one_file(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    out = tmp_path / "q.onnx"
    toolkit.quantize(src, out, calibration_data=_data())
    assert not out.with_name("q.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)


def test_failing_export_keeps_existing_output_and_leaves_nothing(
    tmp_path: Path, ext_model: Path, toolkit: ortq.Toolkit, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old model")
    out.with_name("q.onnx.data").write_bytes(b"old data")
    before = _digest(tmp_path)
    backend_type = type(toolkit.backend("cpu"))

    def boom(self, result, out_dir):  # noqa: ANN001, ANN202
        raise RuntimeError("export exploded")

    monkeypatch.setattr(backend_type, "export", boom)
    with pytest.raises(ortq.PluginError, match="export exploded"):
        toolkit.quantize(ext_model, out, calibration_data=_data())
    assert _digest(tmp_path) == before


def test_failing_data_write_leaves_nothing(
    tmp_path: Path, ext_model: Path, toolkit: ortq.Toolkit, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old model")
    before = _digest(tmp_path)
    calls = []
    real = model_io._write_all

    def failing(fd, data, offset):  # noqa: ANN001, ANN202
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(model_io, "_write_all", failing)
    with pytest.raises(OSError, match="No space left"):
        toolkit.quantize(ext_model, out, calibration_data=_data(), verify=False)
    assert _digest(tmp_path) == before
    assert calls


@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.bin", r"'\.\.' component"),
        ("sub/../../secret.bin", r"'\.\.' component"),
        ("/etc/passwd", "absolute path"),
        ("link.bin", "through a symlink, outside the model's folder"),
        ("linkdir/secret.bin", "through a symlink, outside the model's folder"),
    ],
)
def test_external_location_outside_the_folder_is_refused(
    tmp_path: Path, toolkit: ortq.Toolkit, monkeypatch: pytest.MonkeyPatch, location: str, message: str
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(1 << 20, np.uint8).tobytes())
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "link.bin").symlink_to(secret)
    (folder / "linkdir").symlink_to(tmp_path)
    path = _save_external(_cnn(), folder / "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    for entry in w2.external_data:
        if entry.key == "location":
            entry.value = location
        elif entry.key == "offset":
            entry.value = "0"
    onnx.save(model, path)
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ortq.ModelError, match=message) as info:
        toolkit.quantize(path, tmp_path / "q.onnx", calibration_data=_data())
    text = str(info.value)
    assert str(path) in text and "'w2'" in text and location in text
    assert not any("secret" in f or "weights.bin" in f for f in opened)  # refused before reading any data
    assert not (tmp_path / "q.onnx").exists()


def test_our_check_does_not_rely_on_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if onnx's own loader stopped refusing traversal, ortq's validation refuses first."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * (1 << 22))
    folder = tmp_path / "in"
    folder.mkdir()
    path = _save_external(_cnn(), folder / "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(model, path)
    loaded = []
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ortq.ModelError, match="'..' component"):
        model_io.read_model(path)
    assert loaded == []


@pytest.mark.parametrize("kind", ["dims", "length", "offset", "overlap"])
def test_oversized_declared_tensor_refused_before_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = _save_external(_cnn(), tmp_path / "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    entries = {e.key: e for e in w2.external_data}
    if kind == "dims":  # 1e12 floats backed by a 4 MB file
        del w2.dims[:]
        w2.dims.extend([1_000_000, 1_000_000])
        entries["length"].value = str(4 * 10**12)
    elif kind == "length":
        entries["length"].value = str(10**15)
    elif kind == "offset":
        entries["offset"].value = str(10**12)
    else:  # every tensor claims the same region many times over
        for i in range(8):
            t = model.graph.initializer.add()
            t.CopyFrom(w2)
            t.name = f"dup{i}"
    onnx.save(model, path)
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ortq.ModelError, match="refused") as info:
        model_io.read_model(path)
    assert str(path) in str(info.value)


def test_configurable_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save_external(_cnn(), tmp_path / "model.onnx")
    monkeypatch.setattr(external_data, "MAX_EXTERNAL_BYTES", 1 << 20)
    with pytest.raises(ortq.ModelError, match="more than the 1048576 bytes"):
        model_io.read_model(path)


def test_proto_with_external_references_refused(ext_model: Path, toolkit: ortq.Toolkit) -> None:
    proto = onnx.load(str(ext_model), load_external_data=False)
    with pytest.raises(ortq.ModelError, match="keeps its data in external file"):
        toolkit.quantize(proto, calibration_data=_data())


def test_over_protobuf_limit_uses_paths(
    tmp_path: Path, ext_model: Path, toolkit: ortq.Toolkit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limit lowered below the float model's size (4.3 MB) but above the int8 one's (1.1 MB), the
    float stages (load check, shape inference, calibration session) go through files and clean them up.

    (verify_model's own checker call is not ortq.io.model_io's, so the quantized model stays under the limit.)
    """
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 2 << 20)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(model_io, "TEMP_DIR", str(temp_root))
    used = {"check_path": 0, "infer_path": 0, "session_path": 0, "session_bytes": 0}
    real_check, real_infer, real_session = onnx.checker.check_model, onnx.shape_inference.infer_shapes_path, ort.InferenceSession

    def check(model, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(model, (str, os.PathLike)):
            used["check_path"] += 1
        else:
            assert model.ByteSize() <= model_io.PROTOBUF_LIMIT, "in-memory checker on a model over the limit"
        return real_check(model, *a, **k)

    def infer(*a, **k):  # noqa: ANN002, ANN003, ANN202
        used["infer_path"] += 1
        return real_infer(*a, **k)

    def in_memory_infer(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("in-memory shape inference on a model over the limit")

    def session(source, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        used["session_path" if isinstance(source, str) else "session_bytes"] += 1
        return real_session(source, *a, **k)

    monkeypatch.setattr(onnx.checker, "check_model", check)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", infer)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", in_memory_infer)
    monkeypatch.setattr(ort, "InferenceSession", session)

    out = tmp_path / "q.onnx"
    result = toolkit.quantize(ext_model, out, calibration_data=_data())
    assert used["check_path"] >= 1 and used["infer_path"] == 1
    assert used["session_path"] == 1 and used["session_bytes"] == 1  # calibration (float), verification (int8)
    assert list(temp_root.iterdir()) == []  # temporary folders removed
    assert out.with_name("q.onnx.data").is_file()
    assert result.verification.min_sqnr_db > 30
    # value_info came back from the path-based shape inference
    assert {"c1", "r1", "f"} <= {vi.name for vi in result.model.graph.value_info} | {
        o.name for o in result.model.graph.output
    }
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 2**31 - 1)
    onnx.checker.check_model(str(out), full_check=True)


def test_inline_input_over_limit_is_written_with_external_data(
    tmp_path: Path, toolkit: ortq.Toolkit, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1 << 19)
    out = tmp_path / "q.onnx"
    toolkit.quantize(src, out, calibration_data=_data(), verify=False)
    assert out.with_name("q.onnx.data").stat().st_size > out.stat().st_size


def test_output_data_file_may_not_overwrite_input_data(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    path = _save_external(_cnn(), tmp_path / "m.onnx", location="q.onnx.data")
    before = _digest(tmp_path)
    with pytest.raises(ortq.ModelError, match="input model's own external data"):
        toolkit.quantize(path, tmp_path / "q.onnx", calibration_data=_data(), verify=False)
    assert _digest(tmp_path) == before


def test_make_session_over_limit_uses_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ortq.pipeline.verify import make_session

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1 << 20)
    monkeypatch.setattr(model_io, "TEMP_DIR", str(tmp_path))
    sources = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda source, *a, **k: (sources.append(source), real(source, *a, **k))[1])
    model = _cnn()
    before = model.SerializeToString()
    x = _data(4)["x"]
    session = make_session(model)
    assert len(sources) == 1 and isinstance(sources[0], str)
    assert list(tmp_path.iterdir()) == []
    assert model.SerializeToString() == before  # the proto is whole again
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], real(before).run(None, {"x": x})[0])
