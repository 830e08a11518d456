"""NudeNet's detector (YOLOv8n, 18 body-part classes incl. FACE_FEMALE / FACE_MALE, 320x320) on real photos.

The model is ``nudenet/320n.onnx`` exactly as shipped in the PyPI wheel ``nudenet==3.4.2`` (12 MB, opset
17, dynamic input size, fed 320x320 here). Preprocessing as nudenet does it: pad right/bottom to a square
with black, resize to 320, RGB / 255. Postprocessing written here: boxes whose best class score >= 0.25,
class-agnostic NMS at IoU 0.45 (nudenet's thresholds are 0.2 / 0.25 / 0.45).
Data: crops of the scikit-image / scikit-learn photographs (``_images.py``) plus mosaics of LFW faces
(``skimage.data.lfw_subset``, 25x25 faces upscaled to 80x80 and tiled 4x4 on a grey background): the
photographs alone hold too few people for a body-part detector to fire often.
No ground truth: the headline metric is box F1 against the float model's detections (same class, IoU >= 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import Case, cached_samples, wheel_files
from cases import _images

NAME = "nudenet_yolov8n"
KIND = "object detector, YOLOv8n (SiLU, DFL softmax, concat head), 320x320"
METRIC = "box F1 vs float detections (IoU >= 0.5, same class)"
PACKAGE, VERSION = "nudenet", "3.4.2"
SIZE = 320
CONF, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5
N_CALIB, N_EVAL = 32, 160


def preprocess(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = max(h, w)
    sq = np.zeros((side, side, 3), np.uint8)
    sq[:h, :w] = img
    x = _images.resize(sq, SIZE, SIZE).astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _face_mosaics(n: int, seed: int, exclude_even: bool) -> list[np.ndarray]:
    """4x4 mosaics of LFW faces; calibration uses even-numbered faces, evaluation odd ones (disjoint)."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]
    pool = faces[0::2] if exclude_even is False else faces[1::2]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        canvas = np.full((4 * 96, 4 * 96, 3), 128, np.uint8)
        for k in range(16):
            f = pool[int(rng.integers(len(pool)))]
            f = f[:, ::-1] if rng.random() < 0.5 else f
            s = int(rng.integers(56, 96))
            tile = _images.resize(np.stack([f * 255] * 3, -1).astype(np.uint8), s, s)
            r, c = divmod(k, 4)
            y, x = r * 96 + int(rng.integers(0, 97 - s)), c * 96 + int(rng.integers(0, 97 - s))
            canvas[y:y + s, x:x + s] = tile
        out.append(canvas)
    return out


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    n_mosaic = n // 4
    photos = [img for _, img in _images.crops(n - n_mosaic, seed, min_scale=0.5)]
    mosaics = _face_mosaics(n_mosaic, seed, exclude_even=seed % 2 == 1)
    imgs = []  # every 4th sample a mosaic, so that any prefix (--small) has both kinds
    while photos or mosaics:
        imgs += [photos.pop(0) for _ in range(3) if photos] + ([mosaics.pop(0)] if mosaics else [])
    return [{"images": preprocess(img)} for img in imgs]


def detect(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy, scores, classes) after thresholding and class-agnostic NMS."""
    p = out[0].T  # anchors x (4 + classes)
    cls = p[:, 4:]
    score = cls.max(1)
    keep = score >= CONF
    p, score, label = p[keep], score[keep], cls[keep].argmax(1)
    cx, cy, w, h = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    order = np.argsort(-score)
    chosen = []
    while order.size:
        i = order[0]
        chosen.append(i)
        order = order[1:][iou(boxes[i:i + 1], boxes[order[1:]])[0] < NMS_IOU]
    chosen = np.array(chosen, int)
    return boxes[chosen], score[chosen], label[chosen]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def match(ref, got) -> tuple[int, list[float]]:
    """Greedy matching, highest score first: true positives and their IoUs."""
    rb, _, rl = ref
    gb, gs, gl = got
    if not len(rb) or not len(gb):
        return 0, []
    m = iou(gb, rb)
    used = np.zeros(len(rb), bool)
    tp, ious = 0, []
    for i in np.argsort(-gs):
        cand = np.where((~used) & (rl == gl[i]), m[i], 0)
        j = int(cand.argmax())
        if cand[j] >= MATCH_IOU:
            used[j] = True
            tp += 1
            ious.append(float(cand[j]))
    return tp, ious


def score(float_out, quant_out) -> dict[str, float]:
    tp = nf = nq = 0
    ious: list[float] = []
    for fo, qo in zip(float_out, quant_out):
        fd, qd = detect(fo[0]), detect(qo[0])
        t, i = match(fd, qd)
        tp, nf, nq = tp + t, nf + len(fd[0]), nq + len(qd[0])
        ious += i
    f = np.concatenate([o[0] for o in float_out]).astype(np.float64)
    q = np.concatenate([o[0] for o in quant_out]).astype(np.float64)

    def sqnr(a, b):
        return float(10 * np.log10((a ** 2).sum() / max(((a - b) ** 2).sum(), 1e-300)))

    prec = tp / nq if nq else 1.0
    rec = tp / nf if nf else 1.0
    return {
        "box_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "precision": prec, "recall": rec,
        "matched_iou": float(np.mean(ious)) if ious else 0.0,
        "score_sqnr_db": sqnr(f[:, 4:], q[:, 4:]),
        "box_sqnr_db": sqnr(f[:, :4], q[:, :4]),
        "float_boxes": float(nf),
    }


def prepare(cache_dir: Path) -> Case:
    root = cache_dir / NAME
    root.mkdir(parents=True, exist_ok=True)
    model = wheel_files(PACKAGE, VERSION, cache_dir) / "nudenet" / "320n.onnx"
    calib = cached_samples(root / "calibration.npz", lambda: _samples(N_CALIB, seed=0))
    evaln = cached_samples(root / "evaluation.npz", lambda: _samples(N_EVAL, seed=1))
    # The output Concat joins box coordinates (0..320 px) and class probabilities (0..1): quantized with one
    # scale, every probability rounds to 0 or 1.25. The "+excl" configs leave that one node float.
    return Case(model_path=model, calibration=calib, evaluation=evaln, score=score,
                nodes_to_exclude=["/model.22/Concat_25"],
                notes="no ground truth: agreement with the float model's detections")
