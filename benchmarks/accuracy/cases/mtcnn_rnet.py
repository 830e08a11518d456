"""MTCNN's R-Net (face / non-face classifier + box refinement) on LFW faces vs non-faces, with ground truth.

The weights are ``facenet_pytorch/data/rnet.pt`` from the PyPI wheel ``facenet-pytorch==2.6.0`` (the
Caffe MTCNN weights, 0.4 MB). The ONNX graph is built here, mirroring facenet-pytorch's RNet: three convs
with PReLU and ceil-mode max pools, a (W, H, C) flatten, a PReLU dense layer, then a softmax face
probability and a 4-value box regression.
Data: ``skimage.data.lfw_subset()``: 100 face and 100 non-face 25x25 grey crops from LFW (resized to
24x24, grey copied to RGB, scaled as MTCNN does: (x - 127.5) / 128). 16 faces + 16 non-faces (every 6th
image) calibrate; the other 168 images evaluate. Each LFW image is used twice: as is, and jittered (a random 21-25 px square crop, so IoU >= 0.7 with the
original, which MTCNN's own training calls a positive; random flip, contrast x0.8-1.2, brightness +-0.1).
Ground truth: face / non-face label; no LFW image is in both sets (336 evaluation samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import Case, wheel_files
from cases._build import Graph, load_state_dict

NAME = "mtcnn_rnet"
KIND = "small CNN classifier + regressor, PReLU, ceil-mode MaxPool, Gemm (MTCNN R-Net)"
METRIC = "box-regression SQNR vs float (dB); face/non-face accuracy vs ground truth is saturated (1.0 float)"
PACKAGE, VERSION = "facenet-pytorch", "2.6.0"
THRESHOLD = 0.5


def _build_onnx(sd: dict[str, np.ndarray], path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = Graph()

    def prelu(x: str, slope: np.ndarray, spatial: bool = True) -> str:
        shape = (-1, 1, 1) if spatial else (-1,)
        return g.op("PRelu", [x, g.const("slope", slope.reshape(shape).astype(np.float32))], "prelu")

    x = g.conv("input", sd["conv1.weight"], sd["conv1.bias"], base="conv1")
    x = prelu(x, sd["prelu1.weight"])
    x = g.op("MaxPool", [x], "pool1", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    x = g.conv(x, sd["conv2.weight"], sd["conv2.bias"], base="conv2")
    x = prelu(x, sd["prelu2.weight"])
    x = g.op("MaxPool", [x], "pool2", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    x = g.conv(x, sd["conv3.weight"], sd["conv3.bias"], base="conv3")
    x = prelu(x, sd["prelu3.weight"])
    x = g.op("Transpose", [x], "permute_whc", perm=[0, 3, 2, 1])
    x = g.op("Flatten", [x], "flatten", axis=1)
    x = g.op("Gemm", [x, g.const("dense4_w", sd["dense4.weight"]), g.const("dense4_b", sd["dense4.bias"])],
             "dense4", transB=1)
    x = prelu(x, sd["prelu4.weight"], spatial=False)
    a = g.op("Gemm", [x, g.const("dense5_1_w", sd["dense5_1.weight"]), g.const("dense5_1_b", sd["dense5_1.bias"])],
             "dense5_1", transB=1)
    b = g.op("Gemm", [x, g.const("dense5_2_w", sd["dense5_2.weight"]), g.const("dense5_2_b", sd["dense5_2.bias"])],
             "dense5_2", transB=1)
    g.nodes[-1].output[0] = "box"
    g.op("Softmax", [a], "prob", axis=1)
    g.nodes[-1].output[0] = "prob"
    del b
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 24, 24])
    outs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("box", TensorProto.FLOAT, ["N", 4])]
    onnx.save(g.model([inp], outs, name="mtcnn_rnet"), str(path))


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and source index: every LFW crop as is, then once more jittered (see module doc)."""
    import skimage.data
    from skimage.transform import resize

    faces = skimage.data.lfw_subset()  # 200 x 25 x 25, float in [0, 1]; first 100 faces, last 100 not
    labels = np.array([1] * 100 + [0] * 100)
    rng = np.random.default_rng(0)
    imgs = [resize(f, (24, 24), order=1, anti_aliasing=True) for f in faces]
    for f in faces:
        side = int(rng.integers(21, 26))
        y, x0 = rng.integers(0, 26 - side, size=2)
        crop = f[y:y + side, x0:x0 + side]
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        crop = (crop - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
        imgs.append(np.clip(resize(crop, (24, 24), order=1, anti_aliasing=True), 0, 1))
    labels = np.concatenate([labels, labels])
    source = np.concatenate([np.arange(200), np.arange(200)])
    x = np.stack(imgs) * 255.0
    x = ((x - 127.5) * 0.0078125).astype(np.float32)
    return np.repeat(x[:, None], 3, axis=1), labels, source


def _split(source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibration: 16 faces + 16 non-faces (every 6th LFW image, plain or jittered alternately);
    evaluation: both versions of every other LFW image, so no source image is in both sets."""
    idx = np.arange(200)
    chosen = idx[idx % 6 == 0]  # 17 faces and 17 non-faces: keep 16 of each
    chosen = np.concatenate([chosen[chosen < 100][:16], chosen[chosen >= 100][:16]])
    calib = np.array([i if k % 2 == 0 else i + 200 for k, i in enumerate(chosen)])
    evaln = np.flatnonzero(~np.isin(source, chosen))
    return calib, np.random.default_rng(1).permutation(evaln)  # mixed order: any prefix (--small) has both


def make_score(labels: np.ndarray):  # noqa: ANN201
    def score(float_out, quant_out) -> dict[str, float]:
        gt = labels[:len(float_out)].astype(bool)
        fp = np.concatenate([o[0] for o in float_out])[:, 1]
        qp = np.concatenate([o[0] for o in quant_out])[:, 1]
        fb = np.concatenate([o[1] for o in float_out])
        qb = np.concatenate([o[1] for o in quant_out])
        err = ((fb - qb) ** 2).sum()
        return {
            "box_sqnr_db": float(10 * np.log10((fb ** 2).sum() / err)) if err > 0 else float("inf"),
            "accuracy_vs_gt": float(((qp > THRESHOLD) == gt).mean()),
            "decision_agree": float(((qp > THRESHOLD) == (fp > THRESHOLD)).mean()),
            "prob_mae": float(np.abs(fp - qp).mean()),
            "box_mae": float(np.abs(fb - qb).mean()),
        }

    return score


def prepare(cache_dir: Path) -> Case:
    root = cache_dir / NAME
    root.mkdir(parents=True, exist_ok=True)
    model = root / "mtcnn_rnet.onnx"
    if not model.exists():
        files = wheel_files(PACKAGE, VERSION, cache_dir)
        tmp = model.with_suffix(".tmp.onnx")
        _build_onnx(load_state_dict(files / "facenet_pytorch" / "data" / "rnet.pt"), tmp)
        tmp.replace(model)
    x, labels, source = _data()
    ci, ei = _split(source)
    calib = [{"input": x[i:i + 1]} for i in ci]
    evaln = [{"input": x[i:i + 1]} for i in ei]
    return Case(model_path=model, calibration=calib, evaluation=evaln, score=make_score(labels[ei]),
                notes="ground truth: LFW face / non-face")
