"""Calibration on a Ray cluster: workers observe shards, the driver merges their statistics.

ortq's statistics are exact and mergeable (min/max, and histograms whose bins only ever merge in pairs),
so calibrating shard by shard on many machines and merging the states gives exactly the statistics of one
process reading every shard. This module hands that work to Ray, the engine ML teams already run, rather
than to a scheduler of ortq's own:

- the driver prepares and plans the model once (:func:`ortq.pipeline.run.calibration_job`) and puts the
  serialized model in Ray's object store once; each worker (a Ray actor) loads it and builds its
  observed ONNX Runtime session once, then calibrates one shard per call;
- what comes back is one :class:`~ortq.io.state.CalibrationState` per shard (statistics, never
  activations); the driver merges them as they arrive, so its memory does not grow with the number of
  shards, and the merge is exact, so the result does not depend on the order they arrive in;
- faults are Ray's to retry: a worker process that dies is restarted and its shard run again, a shard
  that raises is retried, and a shard that keeps failing fails the whole run with the shard's name.
  Nothing partial is ever returned.

Ray is an optional extra (``pip install 'ortq[ray]'``); nothing imports it until a distributed run is
asked for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ortq.core.errors import CalibrationDataError, CalibrationError, ConfigError
from ortq.host.plugin_host import PluginHost
from ortq.io.state import CalibrationState
from ortq.core.report import QuantizationResult
from ortq.pipeline.run import SCHEME_OPTIONS, CalibrationJob, calibration_job, quantize

__all__ = ["Shard", "calibrate_on_ray", "quantize_on_ray", "shards_of", "import_ray", "RAY_INSTALL_HINT"]

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = "distributed calibration needs Ray: pip install 'ortq[ray]'"

#: How often Ray runs a shard again after its worker died or it raised, before the run fails.
DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class Shard:
    """One unit of work: a name for messages and progress, and a source :func:`ortq.io.data.iter_batches`
    reads (a path, a dict of arrays, a reader) or a ``ray.data.Dataset`` split."""

    name: str
    source: Any


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray


def shards_of(data: Any, workers: int | None = None) -> list[Shard]:
    """Split ``data`` into shards.

    - a folder: each ``*.npz`` file, or each sub-folder (any layout ``iter_batches`` reads), is a shard;
    - a list or tuple: each item is a shard (paths, dicts of arrays, readers);
    - a ``ray.data.Dataset``: split into ``workers`` parts (its columns are the model's inputs).
    A single file is one shard: it gains nothing from a cluster, but runs.
    """
    if _is_ray_dataset(data):
        parts = max(1, workers or 1)
        return [Shard(f"dataset part {i}", part) for i, part in enumerate(data.split(parts))]
    if isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationDataError("no calibration shards were given")
        return [Shard(str(item) if isinstance(item, (str, os.PathLike)) else f"shard {i}", item) for i, item in enumerate(data)]
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise CalibrationDataError(f"{path}: no such calibration data file or folder")
        if path.is_file():
            return [Shard(str(path), path)]
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        parts = [p for p in entries if p.suffix == ".npz"] or [p for p in entries if p.is_dir()]
        if not parts:
            raise CalibrationDataError(
                f"{path}: found no shards (expected *.npz files or sub-folders, one per shard)"
            )
        return [Shard(str(p), p) for p in parts]
    return [Shard("data", data)]


def _is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data") and hasattr(data, "split")


class _CalibrationWorker:
    """A Ray actor: the observed session, built once, calibrating one shard per call."""

    def __init__(
        self, model_bytes: bytes, tensors: list[str], calibrator: str, calibrator_options: dict[str, Any],
        fingerprint: str, graph_name: str, providers: Sequence[Any] | None,
    ) -> None:
        import onnx

        from ortq.core.graph import GraphIndex
        from ortq.io.data import model_inputs
        from ortq.pipeline.calibrate import ObservedSession

        model = onnx.load_from_string(model_bytes)
        host = PluginHost()  # the worker's own plugins: built-ins and what its environment installs
        self._job = CalibrationJob(model, tensors, calibrator, calibrator_options, fingerprint, graph_name)
        self._inputs = model_inputs(model)
        self._session = ObservedSession(
            model, GraphIndex(model), tensors, host.calibrator(calibrator, **calibrator_options), providers=providers
        )

    def observe(self, shard: Shard, batch_size: int | None) -> CalibrationState:
        from ortq.io.data import iter_batches

        source = shard.source
        if _is_ray_dataset(source):
            batches: Any = _dataset_batches(source, batch_size)
        else:
            batches = iter_batches(source, self._inputs, batch_size)
        return self._job.state(self._session.observe(batches))


def _dataset_batches(dataset: Any, batch_size: int | None) -> Iterator[dict[str, Any]]:
    from ortq.io.inputs import DEFAULT_BATCH_SIZE

    for batch in dataset.iter_batches(batch_size=batch_size or DEFAULT_BATCH_SIZE, batch_format="numpy"):
        yield dict(batch)


def calibrate_on_ray(
    host: PluginHost,
    model: Any,
    data: Any,
    *,
    address: str | None = None,
    workers: int | None = None,
    target: str = "cpu",
    batch_size: int | None = None,
    providers: Sequence[Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> CalibrationState:
    """Calibrate ``model`` on Ray: the statistics of every shard of ``data``, merged.

    Equal to :func:`ortq.pipeline.run.calibrate` over the same shards in one process, whatever the number
    of workers and the order their results arrive in. ``address`` is a Ray cluster's address (``"auto"``
    for the one this machine belongs to); without one, a Ray already initialised in this process is used,
    else a local one is started and shut down afterwards. ``workers`` defaults to the cluster's CPUs, at
    most one per shard. ``progress(done, total)`` is called as shards finish.
    """
    if overrides.get("max_samples") is not None:
        raise ConfigError("max_samples cannot be honoured across shards; choose the shards instead")
    overrides.pop("max_samples", None)
    for unsupported in ("image_options", "session_options"):
        if overrides.get(unsupported) is not None:
            raise ConfigError(f"{unsupported} is not supported with Ray; workers use ONNX Runtime's defaults")
        overrides.pop(unsupported, None)
    ray = import_ray()
    job = calibration_job(host, model, target=target, **overrides)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif address is not None:
        log.info("Ray is already initialised in this process; using it, not %s", address)
    try:
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        shards = shards_of(data, count)
        return _run(ray, job, shards, min(count, len(shards)), batch_size, providers, retries, progress)
    finally:
        if started_here:
            ray.shutdown()


def quantize_on_ray(
    host: PluginHost,
    model: Any,
    output: Any,
    data: Any,
    *,
    address: str | None = None,
    workers: int | None = None,
    target: str = "cpu",
    batch_size: int | None = None,
    providers: Sequence[Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> QuantizationResult:
    """:func:`ortq.pipeline.run.quantize` with its calibration on Ray (:func:`calibrate_on_ray`).

    The model written is byte-identical to the one a single process makes from the same shards: the
    merged statistics are the same, and everything after calibration runs here, as it would there.
    Verification runs on the driver, on the first shard's first ``verify_samples`` samples.
    """
    if options.get("calibration_state") is not None:
        raise ConfigError("give calibration data (shards) or a calibration state, not both")
    options.pop("calibration_state", None)
    scheme = {key: value for key, value in options.items() if key in SCHEME_OPTIONS}
    state = calibrate_on_ray(
        host, model, data, address=address, workers=workers, target=target, batch_size=batch_size,
        providers=providers, retries=retries, progress=progress, max_samples=options.pop("max_samples", None),
        image_options=options.pop("image_options", None), session_options=options.pop("session_options", None),
        **scheme,
    )
    first = shards_of(data, 1)[0].source if not _is_ray_dataset(data) else None
    return quantize(
        host, model, output, calibration_state=state, target=target, batch_size=batch_size, providers=providers,
        verification_data=first, **options,
    )


def _run(
    ray: Any, job: CalibrationJob, shards: list[Shard], workers: int, batch_size: int | None,
    providers: Sequence[Any] | None, retries: int, progress: Callable[[int, int], None] | None,
) -> CalibrationState:
    from ray.exceptions import RayError, RayTaskError

    model_ref = ray.put(job.model.SerializeToString())  # the model crosses the network once per worker
    actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(_CalibrationWorker)
    pool = [
        actor.remote(model_ref, job.tensors, job.calibrator, job.calibrator_options, job.fingerprint,
                     job.graph_name, list(providers) if providers else None)
        for _ in range(workers)
    ]
    pending: dict[Any, tuple[Shard, Any]] = {}
    queue = list(shards)
    merged: CalibrationState | None = None
    done = 0

    def submit(worker: Any) -> None:
        shard = queue.pop(0)
        ref = worker.observe.options(retry_exceptions=True).remote(shard, batch_size)
        pending[ref] = (shard, worker)

    try:
        for worker in pool:
            if queue:
                submit(worker)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard, worker = pending.pop(ready[0])
            try:
                state = ray.get(ready[0])
            except RayTaskError as exc:
                cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
                raise CalibrationError(f"calibration shard {shard.name} failed after {retries} retries: {_first_line(cause)}") from None
            except RayError as exc:
                raise CalibrationError(f"calibration shard {shard.name}: its worker was lost: {_first_line(exc)}") from None
            merged = state if merged is None else merged.merge(state)
            done += 1
            if progress is not None:
                progress(done, len(shards))
            if queue:
                submit(worker)
    finally:
        for worker in pool:
            ray.kill(worker)
    assert merged is not None  # shards_of never returns an empty list
    return merged


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray prefixes the remote traceback; the cause's own message is the last line.
    return text[-1] if text else type(exc).__name__
