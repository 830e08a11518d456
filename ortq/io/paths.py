"""One check that no output of a command or API call is one of the files it reads.

A user typing ``-o model.onnx`` for ``ortq quantize model.onnx`` (or ``--html calib.npz``, or a path that
reaches the model through ``..``, a symlink or a hard link) would otherwise lose the file they started from:
every writer renames a finished temporary file over its output, which replaces whatever was there. So each
entry point that writes calls :func:`refuse_overwriting_inputs` once, before any work, with every output
and every input it reads (model, the model's external-data files, calibration data, state, overrides,
labels). One rule in one place, instead of a copy per command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

from ortq.core.errors import ModelError

__all__ = ["refuse_overwriting_inputs", "same_file", "model_external_files"]

PathLike = Union[str, os.PathLike]


def _as_path(value: object) -> Path | None:
    """A path if ``value`` names a file or folder; None for arrays, readers, protos, dicts and None."""
    if isinstance(value, (str, os.PathLike)) and str(value) not in ("", "-"):
        return Path(value)
    return None


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether writing ``a`` would replace ``b``: the same real path (``..``, symlinks) or the same inode
    (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: then it is not a hard link of the other
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def _hard_link_in(output: Path, folder: Path) -> Path | None:
    """A file under ``folder`` that ``output`` is a hard link of (only looked for when ``output`` has links)."""
    try:
        st = output.stat()
    except OSError:
        return None
    if st.st_nlink < 2:
        return None
    for root, _, files in os.walk(folder):
        for name in files:
            candidate = Path(root) / name
            try:
                other = candidate.stat()
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return candidate
    return None


def _clash(output: Path, source: Path) -> Path | None:
    """The input file that writing ``output`` would replace, if any."""
    if source.is_dir():
        if output.exists() and not output.is_dir() and _inside(output, source):
            return Path(os.path.realpath(output))
        return _hard_link_in(output, source)
    return source if same_file(output, source) else None


def refuse_overwriting_inputs(
    outputs: Iterable[object],
    inputs: Mapping[str, object | Iterable[object]],
    *,
    models: Iterable[object] = (),
) -> None:
    """Raise :class:`ModelError` (as for any unusable output path) if an output would replace an input.

    ``outputs`` are the paths about to be written (None entries are skipped). ``inputs`` maps what each
    input is ("model", "calibration data", ...) to a path, a list of paths, or something that is not a
    path (an array, a reader, a proto: skipped). A folder input covers every file under it. The
    external-data files of the model files in ``models`` are inputs too; they are looked up only when an
    output already exists (a new file cannot be one of them), so the common case reads no model. Called
    before any work, so a refused call writes nothing.
    """
    named: list[tuple[str, Path]] = []
    for role, value in inputs.items():
        values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
        named.extend((role, p) for p in map(_as_path, values) if p is not None)
    targets = [p for p in map(_as_path, outputs) if p is not None]
    if any(p.exists() for p in targets):
        for model in models:
            named.extend((f"external data of {model}", p) for p in model_external_files(model))
    for output in targets:
        for role, source in named:
            clash = _clash(output, source)
            if clash is None:
                continue
            if clash == source:
                raise ModelError(f"{output}: is the input {role} {str(source)!r}; ortq never overwrites a file it "
                                 "reads, choose another output path")
            raise ModelError(f"{output}: is {str(clash)!r}, a file of the input {role} {str(source)!r}; ortq never "
                             "overwrites a file it reads, choose another output path")


def model_external_files(model: object) -> list[Path]:
    """The external-data files a model file refers to, for :func:`refuse_overwriting_inputs` where the model
    is not loaded yet. Reads only the model's protobuf, not its weights; a model that cannot be read gives
    no files (the stage that loads it reports why)."""
    path = _as_path(model)
    if path is None or not path.is_file():
        return []
    import onnx

    from ortq.io.external_data import external_tensors, location

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - reported properly when the model is loaded
        return []
    files = []
    for tensor in external_tensors(proto):
        name = location(tensor)
        if name and not os.path.isabs(name):
            files.append(path.parent / name)
    return sorted(set(files))
