"""Calibration data from a folder of images, for models with one image input.

A folder of ``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp``/``.ppm`` files (sorted by path; sub-folders too
with ``recursive=True``) becomes batches of ``{input name: array}`` feeds. Each image is converted to RGB or
grayscale, resized (directly, or shorter side then a center crop as in ImageNet evaluation), laid out as NCHW
or NHWC, and normalized as ``(pixel * scale - mean) / std`` per channel. What the model's input declares
(static shape, element type) supplies the defaults; :class:`ImageOptions` overrides them. Only one batch
of pixels is held in memory at a time.

Two ways in::

    # a folder given as calibration data is read with the defaults the model's input implies
    ortq.quantize("model.onnx", "model.int8.onnx", calibration_data="images/")

    # explicit options: a reader bound to the model
    from ortq.io.images import ImageOptions, ImageReader
    options = ImageOptions(size=(224, 224), resize="shorter-side-crop",
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ortq.quantize("model.onnx", "model.int8.onnx", calibration_data=ImageReader("images/", "model.onnx", options))

Pillow is an optional dependency (``pip install 'ortq[images]'``); it is imported only when images are read.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from ortq.io.inputs import DEFAULT_BATCH_SIZE, InputSpec, model_inputs
from ortq.core.errors import CalibrationDataError, ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageOptions",
    "ImageReader",
    "image_files",
    "is_image_folder",
    "iter_image_batches",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")

_LAYOUTS = ("NCHW", "NHWC")
_RESIZE_MODES = ("resize", "shorter-side-crop")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_TENSOR_SUFFIXES = (".npy", ".npz")
_PILLOW_MISSING = "reading images needs Pillow: pip install 'ortq[images]'"


@dataclass(frozen=True)
class ImageOptions:
    """How images become the model's input; ``None`` fields are taken from the model's input.

    * ``size``: ``(height, width)`` (or one int for a square) of the model input; default: the input's static
      spatial dims, required when those are symbolic.
    * ``layout``: ``"NCHW"`` or ``"NHWC"``; default: NCHW if dim 1 is 1 or 3, else NHWC if dim 3 is, else NCHW.
    * ``channels``: 3 (RGB) or 1 (grayscale); default: the input's channel dim, else 3.
    * ``resize``: ``"resize"`` straight to ``size`` (aspect ratio not kept), or ``"shorter-side-crop"``: scale so
      the image covers ``size / crop_fraction``, then center crop ``size`` (ImageNet: 256 then 224, the default
      ``crop_fraction`` 0.875; 1.0 crops just what does not fit).
    * ``scale``, ``mean``, ``std``: a float input gets ``(pixel * scale - mean) / std``; ``mean`` and ``std``
      are one value or one per channel (RGB order), in the scaled units (ImageNet: ``mean=(0.485, 0.456,
      0.406)``, ``std=(0.229, 0.224, 0.225)`` with the default ``scale`` 1/255). A uint8 input gets the raw
      pixels and these are not used.
    * ``interpolation``: ``"nearest"``, ``"bilinear"`` (the default, as torchvision), ``"bicubic"``, ``"lanczos"``.
    * ``recursive``: also read images in sub-folders (in path order).
    """

    size: tuple[int, int] | None = None
    layout: str | None = None
    channels: int | None = None
    resize: str = "resize"
    crop_fraction: float = 0.875
    scale: float = 1.0 / 255.0
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    interpolation: str = "bilinear"
    recursive: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, (int, np.integer)) else tuple(self.size)
            if len(size) != 2 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in size):
                raise ConfigError(f"image size must be (height, width) in positive pixels, not {self.size!r}")
            set_(self, "size", (int(size[0]), int(size[1])))
        if self.layout is not None:
            layout = str(self.layout).upper()
            if layout not in _LAYOUTS:
                raise ConfigError(f"image layout must be one of {list(_LAYOUTS)}, not {self.layout!r}")
            set_(self, "layout", layout)
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"image channels must be 3 (RGB) or 1 (grayscale), not {self.channels!r}")
        if self.resize not in _RESIZE_MODES:
            raise ConfigError(f"image resize mode must be one of {list(_RESIZE_MODES)}, not {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"image interpolation must be one of {list(_INTERPOLATIONS)}, not {self.interpolation!r}")
        if not (isinstance(self.crop_fraction, (int, float)) and 0.0 < self.crop_fraction <= 1.0):
            raise ConfigError(f"crop_fraction must be in (0, 1], not {self.crop_fraction!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"image scale must be a positive number, not {self.scale!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            values = (value,) if isinstance(value, (int, float, np.number)) else tuple(value)
            if len(values) not in (1, 3) or not all(
                isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in values
            ):
                raise ConfigError(f"image {field} must be one number or one per channel, not {value!r}")
            if field == "std" and any(v == 0 for v in values):
                raise ConfigError(f"image std must not be zero: {value!r}")
            set_(self, field, float(values[0]) if len(values) == 1 else tuple(float(v) for v in values))


@dataclass(frozen=True)
class _Plan:
    """Options resolved against the model input: everything needed to turn one image into one sample."""

    name: str
    dtype: np.dtype
    size: tuple[int, int]
    layout: str
    channels: int
    batch: int
    fixed_batch: bool
    options: ImageOptions

    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError(_PILLOW_MISSING) from None
    return Image


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (hidden ones skipped), sorted by their path relative to it."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in candidates:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found.append(rel)
    return [folder / rel for rel in sorted(found, key=lambda r: r.as_posix())]


def is_image_folder(folder: str | os.PathLike, options: ImageOptions | None = None) -> bool:
    """True when ``folder`` holds images and none of the tensor layouts :mod:`ortq.data` reads.

    Tensor files (``.npy``/``.npz``) at the top, or a sub-folder holding ``.npy``/``.pb`` tensors (a sample
    folder), mean it is not an image folder. Images only in sub-folders need ``recursive=True``; without it
    this raises an error saying so rather than reading the sub-folders as (empty) sample folders.
    """
    folder = Path(folder)
    recursive = bool(options and options.recursive)
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    files = [p for p in entries if p.is_file()]
    if any(p.suffix in _TENSOR_SUFFIXES for p in files):
        return False
    subdirs = [p for p in entries if p.is_dir()]
    if any(next(d.glob("*.npy"), None) or next(d.glob("*.pb"), None) for d in subdirs):
        return False
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return True
    if subdirs and image_files(folder, recursive=True):
        if recursive:
            return True
        raise CalibrationDataError(
            f"{folder}: the images are in sub-folders; read them with ImageOptions(recursive=True)"
        )
    return False


def _resolve(inputs: list[InputSpec], options: ImageOptions, batch_size: int | None, where: str) -> _Plan:
    if len(inputs) != 1:
        names = ", ".join(repr(s.name) for s in inputs) or "none"
        raise CalibrationDataError(
            f"{where}: a folder of images can feed a model with exactly one input; this model has {len(inputs)} "
            f"({names}); give calibration data per input (<input>.npy files, .npz, or a data reader)"
        )
    spec = inputs[0]
    dtype = np.dtype(spec.dtype)
    if dtype != np.uint8 and dtype.kind != "f":
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has element type {dtype}; images can feed float or uint8 inputs only"
        )
    shape = spec.shape
    if shape is not None and len(shape) != 4:
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has shape {_fmt(shape)}; an image input needs rank 4 (NCHW or NHWC)"
        )
    dims: tuple[int | None, ...] = shape if shape is not None else (None, None, None, None)

    layout = options.layout
    if layout is None:
        layout = "NCHW" if dims[1] in (1, 3) else "NHWC" if dims[3] in (1, 3) else "NCHW"
    c_dim, h_dim, w_dim = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])

    channels = options.channels
    if c_dim is not None:
        if c_dim not in (1, 3):
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has shape {_fmt(dims)}: {c_dim} channels in {layout} layout; images "
                "give 3 (RGB) or 1 (grayscale); set ImageOptions(layout=...) if the layout was guessed wrong"
            )
        if channels is not None and channels != c_dim:
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has {c_dim} channel(s) ({_fmt(dims)}, {layout}), "
                f"but ImageOptions(channels={channels})"
            )
        channels = c_dim
    channels = channels or 3

    size = options.size
    if size is not None:
        for axis_name, want, got in (("height", h_dim, size[0]), ("width", w_dim, size[1])):
            if want is not None and want != got:
                raise CalibrationDataError(
                    f"{where}: input {spec.name!r} has shape {_fmt(dims)} ({layout}) with {axis_name} {want}, "
                    f"but ImageOptions(size={size})"
                )
    elif h_dim is not None and w_dim is not None:
        size = (h_dim, w_dim)
    else:
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has shape {_fmt(dims) if shape is not None else 'unknown'}, so the image "
            "size is not known; give it: ImageOptions(size=(height, width))"
        )

    for field in ("mean", "std"):
        value = getattr(options, field)
        if isinstance(value, tuple) and len(value) != channels:
            raise CalibrationDataError(
                f"{where}: ImageOptions({field}={value}) has {len(value)} values; input {spec.name!r} has "
                f"{channels} channel(s)"
            )
    if dtype == np.uint8 and (options.mean != 0.0 or options.std != 1.0 or options.scale != 1.0 / 255.0):
        log.warning("%s: input %r is uint8, so it gets raw pixels; scale, mean and std are not applied", where, spec.name)

    fixed = dims[0]
    if fixed is not None:
        if batch_size is not None and batch_size != fixed:
            raise CalibrationDataError(
                f"the model's batch dimension is fixed at {fixed}; batch size {batch_size} cannot be used"
            )
        batch = fixed
    else:
        batch = batch_size or DEFAULT_BATCH_SIZE
    if batch <= 0:
        raise CalibrationDataError(f"batch size must be positive, not {batch}")
    return _Plan(spec.name, dtype, size, layout, channels, batch, fixed is not None, options)


def iter_image_batches(
    folder: str | os.PathLike,
    inputs: list[InputSpec],
    batch_size: int | None = None,
    options: ImageOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``{input name: array}`` read from the images in ``folder``; see :class:`ImageOptions`.

    The options are checked against the model and the folder listed before the first batch is asked for;
    the images are then read one batch at a time. With a fixed batch dimension, leftover images that do not
    fill a batch are dropped (with a warning).
    """
    folder = Path(folder)
    options = options or ImageOptions()
    if not folder.is_dir():
        raise CalibrationDataError(f"{folder}: no such image folder")
    plan = _resolve(inputs, options, batch_size, str(folder))
    files = image_files(folder, options.recursive)
    if not files:
        where = "or its sub-folders " if options.recursive else ""
        raise CalibrationDataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder {where}")
    total = len(files)
    if plan.fixed_batch:
        if total < plan.batch:
            raise CalibrationDataError(
                f"{folder}: {total} image(s), fewer than the model's fixed batch size {plan.batch}"
            )
        usable = total - total % plan.batch
        if usable < total:
            log.warning(
                "%s: the model's batch size is fixed at %d; dropping the last %d image(s)", folder, plan.batch, total - usable
            )
        files = files[:usable]
    _pillow()  # fail now, not at the first batch, when Pillow is missing
    return _batches(files, plan)


def _batches(files: list[Path], plan: _Plan) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(files), plan.batch):
        chunk = files[start : start + plan.batch]
        out = np.empty((len(chunk), *plan.sample_shape()), dtype=plan.dtype)
        for i, path in enumerate(chunk):
            out[i] = _load_sample(path, plan)
        yield {plan.name: out}


def _load_sample(path: Path, plan: _Plan) -> np.ndarray:
    """One image as a ``plan.sample_shape()`` array of ``plan.dtype``."""
    Image = _pillow()
    try:
        with Image.open(path) as img:
            img.load()
            pixels = _to_mode(img, "RGB" if plan.channels == 3 else "L", Image)
            pixels = _resize(pixels, plan, Image)
            array = np.asarray(pixels, dtype=np.uint8)
    except CalibrationDataError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ... for bad files
        raise CalibrationDataError(f"{path}: cannot read as an image: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if plan.layout == "NCHW":
        array = array.transpose(2, 0, 1)
    if plan.dtype == np.uint8:
        return array
    opts = plan.options
    channel_axis = (-1, 1, 1) if plan.layout == "NCHW" else (1, 1, -1)
    mean = np.reshape(np.asarray(opts.mean, dtype=np.float32), channel_axis)
    std = np.reshape(np.asarray(opts.std, dtype=np.float32), channel_axis)
    values = (array.astype(np.float32) * np.float32(opts.scale) - mean) / std
    return values.astype(plan.dtype, copy=False)


def _to_mode(img: Any, mode: str, Image: Any) -> Any:
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits rather than clip at 255
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    return img if img.mode == mode else img.convert(mode)


def _resize(img: Any, plan: _Plan, Image: Any) -> Any:
    height, width = plan.size
    resample = getattr(Image.Resampling, plan.options.interpolation.upper())
    if plan.options.resize == "resize":
        return img.resize((width, height), resample) if img.size != (width, height) else img
    w, h = img.size
    factor = max(height / h, width / w) / plan.options.crop_fraction
    new_w, new_h = max(width, round(w * factor)), max(height, round(h * factor))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class ImageReader:
    """A calibration data reader (``get_next()``, like ONNX Runtime's) over a folder of images.

    Use it to pass :class:`ImageOptions` to :func:`ortq.quantize`: ``calibration_data=ImageReader(folder,
    model, options)``. ``model`` is the model (path or ``ModelProto``) or its list of :class:`InputSpec`.
    Each ``get_next()`` returns one batch; ``rewind()`` starts over. Options are checked on construction.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        model: str | os.PathLike | onnx.ModelProto | list[InputSpec],
        options: ImageOptions | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.options = options or ImageOptions()
        self.batch_size = batch_size
        if isinstance(model, list):
            self.inputs = list(model)
        else:
            if not isinstance(model, onnx.ModelProto):
                try:
                    model = onnx.load(str(model), load_external_data=False)
                except Exception as exc:
                    raise CalibrationDataError(f"{model}: cannot read the model's inputs: {exc}") from None
            self.inputs = model_inputs(model)
        self._iter = iter_image_batches(self.folder, self.inputs, batch_size, self.options)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter_image_batches(self.folder, self.inputs, self.batch_size, self.options)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter_image_batches(self.folder, self.inputs, self.batch_size, self.options)
