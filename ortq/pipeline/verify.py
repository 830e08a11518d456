"""Stage 5: prove the quantized model is valid and say how far it drifted from the float one."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx

from ortq.io.data import feed_samples
from ortq.core.errors import VerificationError
from ortq.core.error_measures import max_abs_error, sqnr_db, top1_agreement
from ortq.io.model_io import check_model, session_source
from ortq.core.report import OutputComparison, VerificationReport

__all__ = ["OutputComparison", "VerificationReport", "verify_model", "make_session", "run_outputs", "LOW_SQNR_DB"]

log = logging.getLogger(__name__)

#: Below this output SQNR a quantized model is unlikely to be useful; the pipeline warns loudly.
LOW_SQNR_DB = 15.0


def make_session(model: onnx.ModelProto, providers: Sequence[Any] | None = None, threads: int = 0):  # noqa: ANN201
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads

    # Bytes, or above the protobuf limit a temporary file with external data, removed once the session is built.
    with session_source(model) as source:
        return ort.InferenceSession(source, so, providers=list(providers or ["CPUExecutionProvider"]))


def run_outputs(session: Any, feeds: Iterable[dict[str, np.ndarray]]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Every output of ``session`` on each feed, by name, with the feeds kept beside them: the reference a
    quantized model is later compared with (the feeds may be a one-pass iterator)."""
    names = [o.name for o in session.get_outputs()]
    kept, outputs = [], []
    for feed in feeds:
        kept.append(feed)
        outputs.append(dict(zip(names, session.run(names, feed))))
    return kept, outputs


def verify_model(
    quantized: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    providers: Sequence[Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerificationReport:
    """Check the quantized model and compare its outputs on ``feeds`` with the float ``reference`` outputs.

    ``progress`` gets each batch's sample count, as calibration's does (on a large model verification
    takes long enough that a silent wait looks like a hang)."""
    try:
        check_model(quantized, full_check=True)  # path-based above the protobuf limit
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"the quantized model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    try:
        session = make_session(quantized, providers)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load the quantized model: {exc}") from None
    report = VerificationReport()
    if not feeds:
        return report
    names = [n for n in reference[0] if np.asarray(reference[0][n]).dtype.kind == "f"]
    actual: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for index, feed in enumerate(feeds):
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise VerificationError(f"ONNX Runtime failed to run the quantized model on batch {index}: {exc}") from None
        for n, value in zip(names, values):
            actual[n].append(np.asarray(value))
        report.samples += feed_samples(feed)
        if progress is not None:
            progress(feed_samples(feed))
    for n in names:
        ref, act = [np.asarray(r[n]) for r in reference], actual[n]
        flat_r = np.concatenate([x.reshape(-1) for x in ref])
        flat_a = np.concatenate([x.reshape(-1) for x in act])
        rows_r = [x.reshape(-1, x.shape[-1]) for x in ref if x.ndim >= 2]
        rows_a = [x.reshape(-1, x.shape[-1]) for x in act if x.ndim >= 2]
        top1 = top1_agreement(np.concatenate(rows_r), np.concatenate(rows_a)) if rows_r else None
        report.outputs.append(OutputComparison(n, sqnr_db(flat_r, flat_a), max_abs_error(flat_r, flat_a), top1))
    return report
