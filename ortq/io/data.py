"""Calibration data: read it from the places users keep it, batch it, and check it against the model.

Accepted sources: an ONNX Runtime ``CalibrationDataReader`` (anything with ``get_next()``), an iterable
of ``{input name: array}`` dicts, a dict of arrays, a ``.npz`` file, or a folder holding either one
``<input name>.npy`` per input, or per-batch ``*.npz`` files, or per-batch sub-folders of
``<input name>.npy`` / ONNX ``TensorProto`` ``.pb`` files (ONNX's ``test_data_set_N`` layout).
Stacked arrays (dict, ``.npz``, one ``.npy`` per input) are cut into batches along axis 0.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.errors import CalibrationDataError

from ortq.io.images import ImageOptions, is_image_folder, iter_image_batches
from ortq.io.inputs import DEFAULT_BATCH_SIZE, InputSpec, model_inputs

__all__ = [
    "InputSpec", "model_inputs", "iter_batches", "feed_samples", "load_npz", "load_npy", "batch_entries",
    "read_batch_entry", "DEFAULT_BATCH_SIZE",
]

log = logging.getLogger(__name__)

#: What numpy raises on a damaged .npy / .npz (a truncated archive is a BadZipFile, a truncated compressed
#: member a zlib error or EOFError): the file's problem, not ortq's.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def iter_batches(
    source: Any,
    inputs: list[InputSpec],
    batch_size: int | None = None,
    max_samples: int | None = None,
    image_options: ImageOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield validated feeds; raises :class:`CalibrationDataError` naming the batch and tensor at fault.

    ``image_options`` (an :class:`ortq.io.images.ImageOptions`) sets how a folder of images is read.
    """
    if source is None:
        raise CalibrationDataError("static quantization needs calibration data; none was given")
    raw = _raw_batches(source, inputs, batch_size, image_options)
    # Errors in a file or folder name it: the batch number alone does not say which data to look at.
    prefix = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
    seen = 0
    count = 0
    for count, feed in enumerate(raw):
        _validate(feed, inputs, f"{prefix}calibration batch {count}", seen)
        yield feed
        seen += feed_samples(feed)
        if max_samples is not None and seen >= max_samples:
            break  # before reading (and decoding) another batch
    else:
        if count == 0 and seen == 0:
            raise CalibrationDataError(f"calibration data {_describe(source)} holds no samples")


def feed_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one feed: the leading dimension of its first input (1 for a scalar input)."""
    first = next(iter(feed.values()))
    return int(first.shape[0]) if np.ndim(first) else 1


def _describe(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _raw_batches(
    source: Any,
    inputs: list[InputSpec],
    batch_size: int | None,
    image_options: ImageOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    if hasattr(source, "get_next"):
        return _from_reader(source)
    if isinstance(source, Mapping):
        return _split(dict(source), inputs, batch_size, "calibration arrays")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(Path(source), inputs, batch_size, image_options)
    if isinstance(source, Iterable):
        return (dict(feed) for feed in source)
    raise CalibrationDataError(f"cannot read calibration data from a {type(source).__name__}")


def _from_reader(reader: Any) -> Iterator[dict[str, np.ndarray]]:
    index = 0
    while True:
        try:
            feed = reader.get_next()
        except Exception as exc:
            raise CalibrationDataError(f"calibration data reader raised at sample {index}: {exc!r}") from exc
        if feed is None:
            return
        if not isinstance(feed, Mapping):
            raise CalibrationDataError(f"calibration data reader returned a {type(feed).__name__} at sample {index}, not a dict")
        yield dict(feed)
        index += 1


def _from_path(
    path: Path,
    inputs: list[InputSpec],
    batch_size: int | None,
    image_options: ImageOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such calibration data file or folder")
    if path.is_file():
        return _split(load_npz(path), inputs, batch_size, str(path))
    names = {spec.name for spec in inputs}
    per_input = [path / f"{_safe(name)}.npy" for name in sorted(names)]
    if names and all(p.is_file() for p in per_input):
        arrays = {name: load_npy(path / f"{_safe(name)}.npy") for name in names}
        return _split(arrays, inputs, batch_size, str(path))

    if is_image_folder(path, image_options):
        return iter_image_batches(path, inputs, batch_size, image_options)
    entries = batch_entries(path)
    if entries:
        return (read_batch_entry(entry, inputs) for entry in entries)
    raise CalibrationDataError(
        f"{path}: found no calibration data (expected <input>.npy files, *.npz files, sample sub-folders, "
        "or image files)"
    )


def batch_entries(folder: Path) -> list[Path]:
    """The entries of a folder of batches, in the order they are read: its ``*.npz`` files, or else its
    sample sub-folders (each entry is one batch). Empty if the folder holds neither."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if p.suffix == ".npz"] or [p for p in entries if p.is_dir()]


def read_batch_entry(entry: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One entry of :func:`batch_entries` as the batch the folder reader makes of it (never re-split), so a
    distributed run reading entries one by one sees exactly the batches a single process sees."""
    return _load_sample_dir(entry, inputs) if entry.is_dir() else load_npz(entry)


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz, never unpickling; a damaged file is a CalibrationDataError naming it."""
    if path.suffix == ".npy":
        raise CalibrationDataError(f"{path}: a single .npy has no input name; use a .npz or <input>.npy in a folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except _UNREADABLE as exc:
        raise CalibrationDataError(f"{path}: cannot read as .npz: {exc}") from None


def load_npy(path: Path) -> np.ndarray:
    """One .npy, never unpickling; a damaged or empty file is a CalibrationDataError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:  # an empty or truncated file raises EOFError
        raise CalibrationDataError(f"{path}: cannot read as .npy: {exc}") from None


def _load_sample_dir(folder: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    for spec in inputs:
        npy = folder / f"{_safe(spec.name)}.npy"
        if npy.is_file():
            feed[spec.name] = load_npy(npy)
    pbs = sorted(folder.glob("*.pb"))
    for position, pb in enumerate(pbs):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(pb.read_bytes())
            array = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise CalibrationDataError(f"{pb}: not an ONNX TensorProto: {exc}") from None
        name = tensor.name or (inputs[position].name if position < len(inputs) else pb.stem)
        feed[name] = array
    if not feed:
        raise CalibrationDataError(f"{folder}: no <input>.npy or .pb tensors in this sample folder")
    return feed


def _split(
    arrays: dict[str, np.ndarray], inputs: list[InputSpec], batch_size: int | None, label: str
) -> Iterator[dict[str, np.ndarray]]:
    if not arrays:
        raise CalibrationDataError(f"{label}: holds no arrays")
    _check_names(arrays, inputs, label)
    lengths = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationDataError(f"{label}: inputs have different sample counts along axis 0: {lengths}")
    total = next(iter(lengths.values()))
    step = _batch_step(inputs, batch_size)
    if total == 0:
        return
    usable = total if step is None else total - total % step if total >= step else 0
    if usable < total:
        log.warning("%s: the model's batch size is fixed at %d; dropping the last %d samples", label, step, total - usable)
    step = step or batch_size or DEFAULT_BATCH_SIZE
    for start in range(0, usable, step):
        yield {name: a[start : start + step] for name, a in arrays.items()}


def _batch_step(inputs: list[InputSpec], batch_size: int | None) -> int | None:
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    if fixed:
        size = fixed.pop()
        if batch_size is not None and batch_size != size:
            raise CalibrationDataError(f"the model's batch dimension is fixed at {size}; batch size {batch_size} cannot be used")
        return size
    return None


def _check_names(feed: Mapping[str, Any], inputs: list[InputSpec], where: str) -> None:
    expected = {spec.name for spec in inputs}
    missing, extra = expected - feed.keys(), feed.keys() - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {sorted(missing)}")
        if extra:
            parts.append(f"unknown name(s) {sorted(extra)}")
        raise CalibrationDataError(f"{where}: {'; '.join(parts)}; the model's inputs are {sorted(expected)}")


def _validate(feed: dict[str, np.ndarray], inputs: list[InputSpec], where: str, first_sample: int) -> None:
    """Check one batch; ``first_sample`` is the index of its first sample in the whole data, so a bad value
    can be traced to the sample that holds it."""
    _check_names(feed, inputs, where)
    for spec in inputs:
        value = feed[spec.name]
        if not isinstance(value, np.ndarray):
            value = feed[spec.name] = np.asarray(value)
        if value.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has dtype {value.dtype}, the model expects {spec.dtype}"
            )
        if spec.shape is not None:
            if value.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"{where}: input {spec.name!r} has shape {value.shape}, the model expects rank {len(spec.shape)} "
                    f"{_fmt(spec.shape)}"
                )
            for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
                if want is not None and got != want:
                    raise CalibrationDataError(
                        f"{where}: input {spec.name!r} has shape {value.shape}, the model expects {_fmt(spec.shape)} "
                        f"(axis {axis})"
                    )
        if value.dtype.kind == "f" and value.size and not np.all(np.isfinite(value)):
            finite = np.isfinite(value)
            bad = int(value.size - np.count_nonzero(finite))
            at = ""
            if value.ndim:  # axis 0 is the batch
                row = int(np.argmin(finite.reshape(len(value), -1).all(axis=1)))
                at = f" (first in sample {first_sample + row})"
            raise CalibrationDataError(f"{where}: input {spec.name!r} contains {bad} NaN or Inf value(s){at}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def count_samples(source: Any, max_samples: int | None = None) -> int | None:
    """Best-effort sample count for a progress bar; None when only reading everything would tell."""
    total: int | None = None
    try:
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            total = _npz_leading_dim(path)
        elif path.is_dir():
            npz = list(path.glob("*.npz"))
            npy = list(path.glob("*.npy"))
            if npy and not npz:
                total = int(np.load(npy[0], mmap_mode="r", allow_pickle=False).shape[0])
    except (TypeError, IndexError, *_UNREADABLE):
        return None  # the reader proper reports unreadable data
    if total is not None and max_samples is not None:
        total = min(total, max_samples)
    return total


def _npz_leading_dim(path: Path) -> int:
    """Axis 0 of the first array in a .npz, from its header only: the progress bar must not load the data."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".npy")]
        if not names:
            return 0
        with archive.open(names[0]) as member:
            major, _ = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
    return int(shape[0]) if shape else 1
