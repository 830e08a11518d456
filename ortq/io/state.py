"""Calibration state: the statistics of a calibration run, saved, loaded and merged without running code.

A state lets calibration be split across processes or machines (merge the shards), resumed (merge a new
run into an old state), and reused (quantize with other options without running the model again).

Format (JSON, UTF-8), version 1::

    {
      "format": "ortq.calibration-state",
      "version": 1,
      "model": {"fingerprint": "<sha256 of the graph's structure and constant values>", "graph": "<name>"},
      "calibrator": "<name of the calibrator whose statistics these are>",
      "samples": <int>, "batches": <int>,
      "statistics": {"<tensor name>": {"kind": "<statistic kind>", ...the statistic's own fields...}}
    }

Loading parses JSON only and builds each statistic with its class's ``from_dict``, chosen by ``kind``
among the statistic classes that registered calibrators declare: a state file may come from someone
else, so nothing in it is ever executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import onnx

from ortq.core.calibrator import Statistic
from ortq.core.errors import CalibrationError
from ortq.io.model_io import write_file_atomic

__all__ = ["CalibrationState", "STATE_FORMAT", "STATE_VERSION", "model_fingerprint"]

STATE_FORMAT = "ortq.calibration-state"
STATE_VERSION = 1


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of what determines the observed values: nodes, their wiring and attributes, and constants."""
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        digest.update(node.op_type.encode())
        digest.update(node.domain.encode())
        for name in (*node.input, "->", *node.output):
            digest.update(name.encode() + b"\0")
        for attr in node.attribute:
            digest.update(attr.SerializeToString())
    for init in graph.initializer:
        digest.update(init.name.encode() + b"\0")
        digest.update(repr(tuple(init.dims)).encode())
        digest.update(init.SerializeToString() if not init.raw_data else init.raw_data)
    return digest.hexdigest()


@dataclass
class CalibrationState:
    """Per-tensor statistics plus what they were computed for."""

    fingerprint: str
    calibrator: str
    statistics: dict[str, Statistic]
    samples: int = 0
    batches: int = 0
    graph: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- merging --------------------------------------------------------------------------------
    def merge(self, other: "CalibrationState") -> "CalibrationState":
        """Fold another shard of the same model's calibration into this state (in place); returns self."""
        if other.fingerprint != self.fingerprint:
            raise CalibrationError("cannot merge calibration states of different models (fingerprints differ)")
        for name, stat in other.statistics.items():
            mine = self.statistics.get(name)
            if mine is None:
                self.statistics[name] = stat
            elif type(mine) is not type(stat):
                raise CalibrationError(
                    f"tensor {name!r}: cannot merge a {stat.kind!r} statistic into a {mine.kind!r} one"
                )
            else:
                mine.merge(stat)
        self.samples += other.samples
        self.batches += other.batches
        return self

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "model": {"fingerprint": self.fingerprint, "graph": self.graph},
            "calibrator": self.calibrator,
            "samples": self.samples,
            "batches": self.batches,
            "statistics": {name: stat.to_dict() for name, stat in self.statistics.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file beside the target, then rename)."""
        out = Path(path)
        if not out.parent.exists():
            raise CalibrationError(f"{out}: output folder {str(out.parent)!r} does not exist")
        write_file_atomic(out, json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=True))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, statistic_types: Iterable[type[Statistic]]) -> "CalibrationState":
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"{source}: no such calibration state file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{source}: not a calibration state (not JSON: {exc})") from None
        return cls.from_dict(data, statistic_types, label=str(source))

    @classmethod
    def from_dict(
        cls, data: Any, statistic_types: Iterable[type[Statistic]], label: str = "calibration state"
    ) -> "CalibrationState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise CalibrationError(f"{label}: not an ortq calibration state (format field missing or wrong)")
        if data.get("version") != STATE_VERSION:
            raise CalibrationError(
                f"{label}: calibration state version {data.get('version')!r}; this ortq reads version {STATE_VERSION}"
            )
        kinds = {t.kind: t for t in statistic_types}

        def field(obj: Any, key: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
            # Name the field and where it should be: a KeyError alone ('statistics') tells the user nothing.
            if not isinstance(obj, dict):
                raise CalibrationError(f"{label}: malformed calibration state: {where} is a JSON "
                                       f"{type(obj).__name__}, not an object")
            if key not in obj:
                raise CalibrationError(f"{label}: malformed calibration state: {where} has no {key!r} field")
            if not isinstance(obj[key], kind):
                raise CalibrationError(f"{label}: malformed calibration state: field {key!r} of {where} is "
                                       f"{type(obj[key]).__name__}, not {getattr(kind, '__name__', 'the right type')}")
            return obj[key]

        model = field(data, "model", "the file", dict)
        fingerprint = field(model, "fingerprint", "'model'", str)
        calibrator = field(data, "calibrator", "the file", str)
        statistics: dict[str, Statistic] = {}
        for name, stat in field(data, "statistics", "the file", dict).items():
            kind = field(stat, "kind", f"the statistics of tensor {name!r}", str)
            if kind not in kinds:
                known = ", ".join(sorted(kinds)) or "none"
                raise CalibrationError(f"{label}: tensor {name!r} has statistic kind {kind!r}; known kinds: {known}")
            try:
                statistics[name] = kinds[kind].from_dict(stat)
            except KeyError as exc:
                raise CalibrationError(f"{label}: malformed calibration state: the {kind!r} statistics of tensor "
                                       f"{name!r} have no {exc.args[0]!r} field") from None
            except (TypeError, ValueError, AttributeError) as exc:
                raise CalibrationError(f"{label}: malformed calibration state: the {kind!r} statistics of tensor "
                                       f"{name!r} cannot be read ({type(exc).__name__}: {exc})") from None
        try:
            return cls(
                fingerprint=fingerprint, calibrator=calibrator, statistics=statistics,
                samples=int(data.get("samples", 0)), batches=int(data.get("batches", 0)),
                graph=str(model.get("graph", "")),
            )
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{label}: malformed calibration state: 'samples' and 'batches' must be integers "
                                   f"({exc})") from None
