"""Calibrators on real pretrained networks: min/max vs auto vs entropy vs percentile vs mse (docs/accuracy.md).

    python benchmarks/bench_calibrators.py recognizer [--calibrators minmax,auto,...]
    python benchmarks/bench_calibrators.py mobilenetv2

``recognizer``: the CTC text recognizer ``common.onnx`` of the PyPI wheel ``ddddocr`` 1.6.1 (a CNN with Swish
blocks, an LSTM and an 8210-class Gemm), downloaded with ``pip download --no-deps ddddocr==1.6.1`` into
``~/.cache/ortq-h8a``. Inputs are captcha-like strings rendered with the DejaVu fonts (``fonts-dejavu-core``) on
noisy backgrounds, grayscale, 64 px high: 32 calibration images (seed 1), 100 evaluation images (seed 2).
Metrics: exact-string accuracy against the rendered text, agreement of the decoded string with the float model,
and the output SQNR. ``mobilenetv2``: the accuracy benchmark's case (``benchmarks/accuracy``), 32 calibration and
200 evaluation photographs; top-1 agreement with float and output SQNR. Quantization is ``ortq.quantize`` with
its defaults except the calibrator, and without the SQNR-floor fallback (so each row is the calibrator alone).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "ortq-h8a"
BENCH = Path(os.environ.get("ORTQ_BENCH_CACHE") or Path.home() / ".cache" / "ortq-bench")
FONTS = [f"/usr/share/fonts/truetype/dejavu/{n}.ttf" for n in ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono-Bold",
                                                                 "DejaVuSans-Bold")]
ALPHABET = "0123456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"


def _session(model):  # noqa: ANN001, ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


# -- the recognizer ---------------------------------------------------------------------------------------------
def _ddddocr() -> tuple[Path, list[str]]:
    wheel = CACHE / "ddddocr-1.6.1-py3-none-any.whl"
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "ddddocr==1.6.1", "-d", str(CACHE)],
                       check=True)
    model = CACHE / "common.onnx"
    with zipfile.ZipFile(wheel) as z:
        if not model.exists():
            model.write_bytes(z.read("ddddocr/common.onnx"))
        source = z.read("ddddocr/charsets.py").decode()
    import ast

    for node in ast.parse(source).body:  # a module of list literals: read, never executed
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CHARSET_BETA" for t in node.targets):
            return model, ast.literal_eval(node.value)
    raise SystemExit("ddddocr's charsets.py has no CHARSET_BETA")


def _render(rng: np.random.Generator, width: int = 160) -> tuple[str, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFont

    text = "".join(rng.choice(list(ALPHABET), rng.integers(4, 7)))
    img = Image.new("RGB", (width, 64), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(rng.integers(30, 40)))
    x = int(rng.integers(4, 14))
    for ch in text:
        draw.text((x, int(rng.integers(6, 20))), ch, font=font, fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
        x += int(font.getlength(ch)) + int(rng.integers(-2, 4))
    for _ in range(int(rng.integers(1, 4))):
        draw.line([tuple(int(v) for v in rng.integers(0, [width, 64])) for _ in range(2)],
                  fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=1)
    for _ in range(150):
        draw.point(tuple(int(v) for v in rng.integers(0, [width, 64])), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return text, (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None, None]


def _decode(logits: np.ndarray, charset: list[str]) -> str:
    idx = logits[:, 0, :].argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(charset[i])
        prev = i
    return "".join(out)


def recognizer(calibrators: list[str]) -> list[dict]:
    model, charset = _ddddocr()
    rng_c, rng_e = np.random.default_rng(1), np.random.default_rng(2)
    calib = np.concatenate([_render(rng_c)[1] for _ in range(32)])
    texts, images = zip(*[_render(rng_e) for _ in range(100)])
    session = _session(str(model))
    reference = [session.run(None, {"input1": x})[0] for x in images]
    float_text = [_decode(o, charset) for o in reference]

    def score(m) -> dict:  # noqa: ANN001
        s = _session(m)
        out = [s.run(None, {"input1": x})[0] for x in images]
        decoded = [_decode(o, charset) for o in out]
        return {"exact": np.mean([d == t for d, t in zip(decoded, texts)]),
                "agreement": np.mean([d == f for d, f in zip(decoded, float_text)]), "sqnr": _sqnr(reference, out)}

    rows = [{"calibrator": "float", **score(str(model))}]
    return rows + _quantize_rows(model, {"input1": calib}, calibrators, score)


# -- MobileNetV2 -------------------------------------------------------------------------------------------------
def mobilenetv2(calibrators: list[str]) -> list[dict]:
    folder = BENCH / "mobilenetv2"
    model = folder / "mobilenet_v2.onnx"
    with np.load(folder / "calibration.npz") as c, np.load(folder / "evaluation.npz") as e:
        calib = np.concatenate([c[f"{i}/input"] for i in range(32)])
        images = [e[f"{i}/input"] for i in range(200)]
    session = _session(str(model))
    reference = [session.run(None, {"input": x})[0] for x in images]

    def score(m) -> dict:  # noqa: ANN001
        s = _session(m)
        out = [s.run(None, {"input": x})[0] for x in images]
        return {"top1": np.mean([a.argmax() == b.argmax() for a, b in zip(reference, out)]),
                "sqnr": _sqnr(reference, out)}

    return _quantize_rows(model, {"input": calib}, calibrators, score)


def _quantize_rows(model: Path, calib: dict, calibrators: list[str], score) -> list[dict]:  # noqa: ANN001
    import ortq

    rows = []
    for spec in calibrators:
        name, _, opts = spec.partition(":")
        options = dict(kv.split("=", 1) for kv in opts.split(",")) if opts else None
        t0 = time.perf_counter()
        result = ortq.Toolkit().quantize(str(model), None, calibration_data=calib, batch_size=1,
                                         calibrate_method=name, calibrator_options=options, sqnr_floor=None)
        seconds = time.perf_counter() - t0
        rows.append({"calibrator": spec, **score(result.model), "calibrate_s": result.seconds.get("calibrate", 0.0),
                     "quantize_s": seconds})
        print(rows[-1], flush=True)
    return rows


def _sqnr(reference: list[np.ndarray], out: list[np.ndarray]) -> float:
    f = np.concatenate([a.ravel() for a in reference]).astype(np.float64)
    q = np.concatenate([a.ravel() for a in out]).astype(np.float64)
    noise = np.sum((f - q) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(f * f) / noise))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("recognizer", "mobilenetv2"))
    parser.add_argument("--calibrators", default="minmax,auto,entropy,percentile,mse")
    args = parser.parse_args()
    run = recognizer if args.model == "recognizer" else mobilenetv2
    for row in run(args.calibrators.split(",")):
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
