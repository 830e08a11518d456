"""SQNR of ONNX Runtime's and ortq's models on every quantization call of ONNX Runtime's own tests.

A pytest plugin for the peer suite (``../shared/peer-ort-suite``), loaded *before* its ``ortq_shim``:

    . /tmp/ort-peer-suite/venv/bin/activate
    PYTHONPATH=benchmarks:../shared/peer-ort-suite/shim PEER_SQNR_LOG=/tmp/sqnr.jsonl \\
        python -m pytest ../shared/peer-ort-suite/ort_tests/test_qdq.py -p peer_ort_sqnr -p ortq_shim

Each ``quantize_static``/``quantize_dynamic`` call a test makes is run twice on the same data: by ONNX
Runtime's own function (to a side file) and by ortq (the file the test then checks). The calibration reader is
read once into a list and replayed to both; dynamic calls get seeded random inputs. Both models and the float
model then run on those inputs, and one JSON line per call records each float output's SQNR (dB) for both,
so a test that fails only because it asserts ONNX Runtime's exact graph can be shown to lose no accuracy.
Nothing here is imported by ortq; ONNX Runtime's tests stay outside the repository.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.quantization as oq

oqq = importlib.import_module("onnxruntime.quantization.quantize")  # the attribute is the function of that name

_LOG = os.environ.get("PEER_SQNR_LOG")
_ORT = {"quantize_static": oqq.quantize_static, "quantize_dynamic": oqq.quantize_dynamic}


class _Replay:
    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = list(feeds)

    def get_next(self):  # noqa: ANN201
        return self.feeds.pop(0) if self.feeds else None


def _random_feeds(model: onnx.ModelProto) -> list[dict]:
    rng = np.random.default_rng(0)
    feed = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feed[vi.name] = (rng.standard_normal(shape) if dtype.kind == "f" else np.zeros(shape)).astype(dtype)
    return [feed]


def _run(model: str | onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def _sqnr(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> list[float | None]:
    out = []
    for j in range(len(ref[0])):
        r = np.concatenate([np.asarray(b[j], np.float64).ravel() for b in ref])
        if r.dtype.kind != "f" or np.asarray(ref[0][j]).dtype.kind != "f":
            out.append(None)
            continue
        g = np.concatenate([np.asarray(b[j], np.float64).ravel() for b in got])
        noise = float(np.sum((r - g) ** 2))
        out.append(float("inf") if noise == 0 else round(10 * np.log10(max(float(np.sum(r**2)), 1e-30) / noise), 2))
    return out


def _wrap(name: str, ortq_fn):  # noqa: ANN001, ANN202
    def call(model_input, model_output, *args, **kwargs):  # noqa: ANN001, ANN202
        args = list(args)
        if name == "quantize_static":
            reader = kwargs.pop("calibration_data_reader", None) if not args else args.pop(0)
            feeds = []
            while reader is not None and (f := reader.get_next()) is not None:
                feeds.append(f)
            make = lambda: _Replay(feeds) if reader is not None else None  # noqa: E731
        else:
            feeds, make = None, None
        model = model_input if isinstance(model_input, onnx.ModelProto) else onnx.load(str(model_input))
        if not feeds:
            feeds = _random_feeds(model)
        ort_out = str(model_output) + ".ort-reference.onnx"
        record = {"fn": name, "test": os.environ.get("PEER_SQNR_TEST", os.environ.get("PYTEST_CURRENT_TEST", ""))}
        try:
            lead = [make()] if name == "quantize_static" else []
            _ORT[name](model_input, ort_out, *lead, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            record["ort_error"] = f"{type(exc).__name__}: {exc}"[:300]
            ort_out = None
        lead = [make()] if name == "quantize_static" else []
        try:
            result = ortq_fn(model_input, model_output, *lead, *args, **kwargs)
        except Exception as exc:
            record["ortq_error"] = f"{type(exc).__name__}: {exc}"[:300]
            _write(record)
            raise
        try:
            ref = _run(model, feeds)
            record["ortq_sqnr"] = _sqnr(ref, _run(str(model_output), feeds))
            if ort_out:
                record["ort_sqnr"] = _sqnr(ref, _run(ort_out, feeds))
        except Exception as exc:  # noqa: BLE001
            record["eval_error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if ort_out:
                Path(ort_out).unlink(missing_ok=True)
        _write(record)
        return result

    call.__name__ = name
    return call


def _write(record: dict) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_configure(config) -> None:  # noqa: ANN001
    """After the shim swapped ortq's functions in: wrap them so each call also runs ONNX Runtime's."""
    for name in _ORT:
        current = getattr(oq, name)
        if current is _ORT[name]:
            continue  # the shim is not loaded: nothing to compare
        wrapped = _wrap(name, current)
        for module in (oq, oqq):
            setattr(module, name, wrapped)
