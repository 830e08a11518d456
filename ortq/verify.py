"""Stage 5: prove the quantized model is valid and say how far it drifted from the float one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from .errors import VerificationError
from .metrics import max_abs_error, sqnr_db, top1_agreement

__all__ = ["OutputComparison", "VerificationReport", "verify_model", "LOW_SQNR_DB"]

log = logging.getLogger(__name__)

#: Below this output SQNR a quantized model is unlikely to be useful; the pipeline warns loudly.
LOW_SQNR_DB = 15.0


@dataclass
class OutputComparison:
    name: str
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


@dataclass
class VerificationReport:
    samples: int = 0
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def min_sqnr_db(self) -> float | None:
        return min((o.sqnr_db for o in self.outputs), default=None)


def make_session(model: onnx.ModelProto, providers: Sequence[Any] | None = None, threads: int = 0):  # noqa: ANN201
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"]))


def verify_model(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    providers: Sequence[Any] | None = None,
) -> VerificationReport:
    """Check the quantized model and compare its outputs with the float model's on ``feeds``."""
    try:
        onnx.checker.check_model(quantized, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"the quantized model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    try:
        q_session = make_session(quantized, providers)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load the quantized model: {exc}") from None
    report = VerificationReport()
    if not feeds:
        return report
    f_session = make_session(float_model, providers)
    names = [o.name for o in f_session.get_outputs()]
    ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    act: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, r, a in zip(names, f_session.run(names, feed), q_session.run(names, feed)):
            ref[n].append(np.asarray(r))
            act[n].append(np.asarray(a))
        report.samples += int(next(iter(feed.values())).shape[0]) if feeds else 0
    for n in names:
        if not ref[n] or np.asarray(ref[n][0]).dtype.kind != "f":
            continue
        r = np.concatenate([x.reshape(-1) for x in ref[n]])
        a = np.concatenate([x.reshape(-1) for x in act[n]])
        rows_r = [x.reshape(-1, x.shape[-1]) for x in ref[n] if x.ndim >= 2]
        rows_a = [x.reshape(-1, x.shape[-1]) for x in act[n] if x.ndim >= 2]
        top1 = top1_agreement(np.concatenate(rows_r), np.concatenate(rows_a)) if rows_r else None
        report.outputs.append(OutputComparison(n, sqnr_db(r, a), max_abs_error(r, a), top1))
    return report
