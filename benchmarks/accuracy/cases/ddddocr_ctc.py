"""ddddocr's CTC text recognizer (``common.onnx``, the "beta" model) on rendered captcha images.

Model: ``ddddocr==1.6.1`` from PyPI ships ``ddddocr/common.onnx`` (54 MB, float32, exported from PyTorch):
a 21-Conv backbone with SiLU (Sigmoid*Mul) activations, one bidirectional LSTM and a Gemm over 8210
classes, emitting CTC logits ``[T, 1, 8210]`` for a ``[1, 1, 64, W]`` grey image in [0, 1]. The file
declares its output as ``[1, seqlen]``, which is wrong (ONNX Runtime warns on every run), and has opset 12,
on which ONNX Runtime's ``quantize_static`` writes per-channel DequantizeLinear nodes with an ``axis`` that
opset 12 does not have (an invalid model). The cached copy gets the output declaration corrected and is
converted to opset 17 with ``onnx.version_converter`` (outputs bit-identical); nothing else changes. (``common_old.onnx`` in the same wheel is already
dynamically quantized, so it is not usable as a float reference.)

Data: captcha-like images rendered here with Pillow: 4-6 characters from ``a-z2-9`` less the ambiguous
``i l o 0 1``, each in a random DejaVu face (Sans/Serif/Mono, regular/bold/oblique), size, rotation and
dark colour, on a light noisy background with interference lines and dots, 160x60 then resized to the
model's height of 64 exactly as ddddocr does (grey, /255). Ground truth is the rendered string; the model
answers in lower case. Calibration and evaluation use different seeds (no image is shared).

Fonts come from the machine (``/usr/share/fonts/truetype/dejavu``) or, if absent, from matplotlib's wheel,
which ships the same DejaVu faces.

Metrics: exact-string accuracy against ground truth (headline), agreement of the decoded string with the
float model, character error rate, and SQNR of the logits against the float model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from harness import Case, cached_samples, wheel_files

NAME = "ddddocr_ctc"
KIND = "CTC text recognizer: CNN (SiLU) + BiLSTM + Gemm, 8210 classes (ddddocr common.onnx)"
METRIC = "exact-string accuracy vs ground truth"
PACKAGE, VERSION = "ddddocr", "1.6.1"
N_CALIB, N_EVAL = 32, 200
ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
FACES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"]
CANVAS = (160, 60)
HEIGHT = 64


def _font_dir(cache_dir: Path) -> Path:
    system = Path("/usr/share/fonts/truetype/dejavu")
    if all((system / f).exists() for f in FACES):
        return system
    files = wheel_files("matplotlib", "3.10.7", cache_dir)
    return files / "matplotlib" / "mpl-data" / "fonts" / "ttf"


def charset(files: Path) -> list[str]:
    """The 8210-entry charset of ``common.onnx`` (ddddocr's "beta" list), read from the wheel's source
    without importing ddddocr."""
    tree = ast.parse((files / "ddddocr" / "models" / "charset_manager.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_beta_charset":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return):
                    return ast.literal_eval(sub.value)
    raise RuntimeError("beta charset not found in ddddocr's charset_manager.py")


def render(text: str, rng: np.random.Generator, fonts: list[Path]):  # noqa: ANN201 - a PIL image
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    w, h = CANVAS
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    noise = rng.integers(-25, 26, (h, w, 1))
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # interference lines behind the text
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=int(rng.integers(1, 3)))
    x = float(rng.uniform(4, 12))
    step = (w - 2 * x) / len(text)
    for ch in text:
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(30, 40)))
        glyph = Image.new("L", (56, 56), 0)
        ImageDraw.Draw(glyph).text((28, 28), ch, font=font, fill=255, anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC)
        colour = tuple(int(v) for v in rng.integers(0, 110, 3))
        y = int(rng.integers(-2, 8))
        img.paste(Image.new("RGB", glyph.size, colour), (int(x + step / 2 - 28), y), glyph)
        x += step * float(rng.uniform(0.9, 1.05))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(80, 200))):  # dots over the text
        px, py = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.point((px, py), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img


def preprocess(img) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """ddddocr's own preprocessing: height 64 keeping the aspect, grey, /255, [1, 1, 64, W]."""
    from PIL import Image

    width = int(img.size[0] * (HEIGHT / img.size[1]))
    img = img.resize((width, HEIGHT), Image.LANCZOS).convert("L")
    return (np.asarray(img, np.float32) / 255.0)[None, None]


def _samples(n: int, seed: int, fonts: list[Path]) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    rng = np.random.default_rng(seed)
    samples, texts = [], []
    for _ in range(n):
        text = "".join(ALPHABET[int(i)] for i in rng.integers(0, len(ALPHABET), int(rng.integers(4, 7))))
        samples.append({"input1": preprocess(render(text, rng, fonts))})
        texts.append(text)
    return samples, texts


def ctc_decode(logits: np.ndarray, chars: list[str]) -> str:
    idx = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    out, prev = [], -1
    for i in idx:
        i = int(i)
        if i != prev and i != 0:
            out.append(chars[i])
        prev = i
    return "".join(out)


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def make_score(texts: list[str], chars: list[str]):  # noqa: ANN201 - the score callable
    def score(float_out, quant_out) -> dict[str, float]:
        fs = [ctc_decode(o[0], chars) for o in float_out]
        qs = [ctc_decode(o[0], chars) for o in quant_out]
        f = np.concatenate([o[0].ravel() for o in float_out]).astype(np.float64)
        q = np.concatenate([o[0].ravel() for o in quant_out]).astype(np.float64)
        err = ((f - q) ** 2).sum()
        return {
            "accuracy": float(np.mean([q_ == t for q_, t in zip(qs, texts)])),
            "agree_with_float": float(np.mean([q_ == f_ for q_, f_ in zip(qs, fs)])),
            "cer": float(sum(_edit_distance(q_, t) for q_, t in zip(qs, texts)) / sum(len(t) for t in texts)),
            "sqnr_db": float(10 * np.log10((f ** 2).sum() / err)) if err > 0 else float("inf"),
        }

    return score


def _fixed_model(src: Path, dst: Path) -> None:
    """Copy ``common.onnx`` at opset 17 with its output declared as ``[T, 1, 8210]`` (not ``[1, T]``)."""
    import onnx
    from onnx import version_converter

    model = version_converter.convert_version(onnx.load(str(src)), 17)
    out = model.graph.output[0]
    out.type.tensor_type.ClearField("shape")
    for d in ("seq_len", 1, 8210):
        dim = out.type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    tmp = dst.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    tmp.replace(dst)


def prepare(cache_dir: Path) -> Case:
    root = cache_dir / NAME
    root.mkdir(parents=True, exist_ok=True)
    files = wheel_files(PACKAGE, VERSION, cache_dir)
    model = root / "common.opset17.onnx"
    if not model.exists():
        _fixed_model(files / "ddddocr" / "common.onnx", model)
    chars = charset(files)
    fonts = [_font_dir(cache_dir) / f for f in FACES]
    calib = cached_samples(root / "calibration.npz", lambda: _samples(N_CALIB, 0, fonts)[0])
    texts_file = root / "evaluation_texts.txt"
    if not texts_file.exists() or not (root / "evaluation.npz").exists():
        samples, texts = _samples(N_EVAL, 1, fonts)
        (root / "evaluation.npz").unlink(missing_ok=True)
        evaln = cached_samples(root / "evaluation.npz", lambda: samples)
        texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    else:
        evaln = cached_samples(root / "evaluation.npz", lambda: [])
    texts = texts_file.read_text(encoding="utf-8").split()
    return Case(model_path=model, calibration=calib, evaluation=evaln, score=make_score(texts, chars),
                notes="ground truth = the rendered string; agree_with_float compares decoded strings")
