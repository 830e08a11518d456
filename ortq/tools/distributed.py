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

import contextlib
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ortq.core.errors import CalibrationDataError, CalibrationError, ConfigError
from ortq.core.metric import Metric
from ortq.host.plugin_host import PluginHost
from ortq.io.state import CalibrationState
from ortq.core.report import QuantizationResult
from ortq.pipeline.run import SCHEME_OPTIONS, CalibrationJob, calibration_job, quantize

__all__ = [
    "Shard", "calibrate_on_ray", "quantize_on_ray", "evaluate_on_ray", "map_on_ray", "shards_of", "import_ray",
    "RAY_INSTALL_HINT",
]

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = "distributed calibration needs Ray: pip install 'ortq[ray]'"

#: How often Ray runs a shard again after its worker died or it raised, before the run fails.
DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class Shard:
    """One unit of work: a name for messages and progress, and a source :func:`ortq.io.data.iter_batches`
    reads (a path, a dict of arrays, a reader) or a ``ray.data.Dataset`` split. ``batch_entry``: the source is
    one entry of a folder of batches, read as exactly the one batch the folder reader makes of it."""

    name: str
    source: Any
    batch_entry: bool = False

    def batches(self, inputs: list[Any], batch_size: int | None) -> Iterator[dict[str, Any]]:
        """The validated feeds of this shard, as a single process reading the whole data would see them."""
        from ortq.io.data import iter_batches, read_batch_entry

        if _is_ray_dataset(self.source):
            return _dataset_batches(self.source, batch_size)
        if self.batch_entry:
            return iter_batches([read_batch_entry(Path(self.source), inputs)], inputs, batch_size)
        return iter_batches(self.source, inputs, batch_size)


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def _ray_session(address: str | None, workers: int | None) -> Iterator[tuple[Any, int]]:
    """Ray and the worker count to use: a Ray already initialised in this process, else one started here
    (at ``address``, or a local one) and shut down on the way out. Workers default to the cluster's CPUs."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif address is not None:
        log.info("Ray is already initialised in this process; using it, not %s", address)
    try:
        yield ray, workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started_here:
            ray.shutdown()


def _pool(ray: Any, worker_class: type, count: int, retries: int, *args: Any) -> list[Any]:
    """``count`` actors of ``worker_class``, each restarted (and its current call retried) when it dies."""
    actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(worker_class)
    return [actor.remote(*args) for _ in range(count)]


def shards_of(data: Any, workers: int | None = None) -> list[Shard]:
    """Split ``data`` into shards.

    - a folder of batches: each ``*.npz`` file, or else each sample sub-folder, is a shard (one batch, as the
      folder reader reads it, so the statistics are exactly a single process's);
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
        from ortq.io.data import batch_entries

        parts = batch_entries(path)
        if not parts:
            raise CalibrationDataError(
                f"{path}: found no shards (expected *.npz files or sample sub-folders, one batch per shard)"
            )
        return [Shard(str(p), p, batch_entry=True) for p in parts]
    return [Shard("data", data)]


def _is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data") and hasattr(data, "split")


class _CalibrationWorker:
    """A Ray actor: the observed session, built once, calibrating one shard per call."""

    def __init__(
        self, model_bytes: bytes, job: CalibrationJob, calibrator: Any, providers: Sequence[Any] | None,
    ) -> None:
        import onnx

        from ortq.core.graph import GraphIndex
        from ortq.io.data import model_inputs
        from ortq.pipeline.calibrate import ObservedSession

        model = onnx.load_from_string(model_bytes)
        self._job = CalibrationJob(model, job.tensors, job.calibrator, job.calibrator_options, job.fingerprint,
                                   job.graph_name)
        self._inputs = model_inputs(model)
        # The driver's calibrator object, so a plugin given to the driver's Toolkit works on workers too.
        self._session = ObservedSession(model, GraphIndex(model), job.tensors, calibrator, providers=providers)

    def observe(self, shard: Shard, batch_size: int | None) -> CalibrationState:
        return self._job.state(self._session.observe(shard.batches(self._inputs, batch_size)))


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
    import_ray()  # before any work: say how to install it
    job = calibration_job(host, model, target=target, **overrides)
    calibrator = host.calibrator(job.calibrator, **job.calibrator_options)
    with _ray_session(address, workers) as (ray, count):
        shards = shards_of(data, count)
        return _run(ray, job, calibrator, shards, min(count, len(shards)), batch_size, providers, retries, progress)


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
    ray: Any, job: CalibrationJob, calibrator: Any, shards: list[Shard], workers: int, batch_size: int | None,
    providers: Sequence[Any] | None, retries: int, progress: Callable[[int, int], None] | None,
) -> CalibrationState:
    model_ref = ray.put(job.model.SerializeToString())  # the model crosses the network once per worker
    import dataclasses

    import onnx

    light = dataclasses.replace(job, model=onnx.ModelProto())  # the weights travel once, through model_ref
    pool = _pool(ray, _CalibrationWorker, workers, retries, model_ref, light, calibrator, list(providers) if providers else None)
    merged: list[CalibrationState] = []

    def fold(_: int, state: CalibrationState) -> None:  # exact, so arrival order does not matter
        if merged:
            merged[0].merge(state)
        else:
            merged.append(state)

    _dispatch(ray, pool, shards, lambda worker, shard: worker.observe.options(retry_exceptions=True).remote(shard, batch_size),
              fold, "calibration", retries, progress)
    return merged[0]


def _dispatch(
    ray: Any, pool: list[Any], shards: list[Shard], call: Callable[[Any, Shard], Any],
    on_result: Callable[[int, Any], None], what: str, retries: int, progress: Callable[[int, int], None] | None,
) -> None:
    """Keep every worker busy with the next shard; hand each result over as it arrives; kill the pool."""
    from ray.exceptions import RayError, RayTaskError

    pending: dict[Any, tuple[int, Any]] = {}
    queue = list(enumerate(shards))
    done = 0

    def submit(worker: Any) -> None:
        index, shard = queue.pop(0)
        pending[call(worker, shard)] = (index, worker)

    try:
        for worker in pool:
            if queue:
                submit(worker)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, worker = pending.pop(ready[0])
            name = shards[index].name
            try:
                result = ray.get(ready[0])
            except RayTaskError as exc:
                cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
                raise CalibrationError(f"{what} shard {name} failed after {retries} retries: {_first_line(cause)}") from None
            except RayError as exc:
                raise CalibrationError(f"{what} shard {name}: its worker was lost: {_first_line(exc)}") from None
            on_result(index, result)
            done += 1
            if progress is not None:
                progress(done, len(shards))
            if queue:
                submit(worker)
    finally:
        for worker in pool:
            ray.kill(worker)


class _EvaluationWorker:
    """A Ray actor: both models' sessions, built once, scoring one shard per call with fresh metrics."""

    def __init__(self, float_bytes: bytes, quant_bytes: bytes, pairs: list[Any], names: tuple[str, str],
                 providers: Sequence[Any] | None, threads: int) -> None:
        import onnx

        from ortq.io.data import model_inputs
        from ortq.tools.evaluate import ModelPair, model_session

        float_model, quant_model = onnx.load_from_string(float_bytes), onnx.load_from_string(quant_bytes)
        self._pairs = pairs  # the driver's fresh metric objects: its plugins' metrics work here too
        self._inputs = model_inputs(float_model)
        self._models = ModelPair(
            model_session(float_model, names[0], providers, threads), model_session(quant_model, names[1], providers, threads),
            [o.name for o in float_model.graph.output], *names,
        )

    def score(self, shard: Shard, labels: str | None, batch_size: int | None) -> Any:
        from ortq.io.data import iter_batches, read_batch_entry
        from ortq.tools.evaluate import resolve_labels, score_batches

        source = read_batch_entry(Path(shard.source), self._inputs) if shard.batch_entry else shard.source
        label_array, source = resolve_labels(labels, source) if labels is not None else (None, source)
        if shard.batch_entry:
            batches: Any = iter_batches([source], self._inputs, batch_size)
        else:
            batches = Shard(shard.name, source).batches(self._inputs, batch_size)
        trim = not any(spec.shape and spec.shape[0] is not None for spec in self._inputs)
        scored = score_batches(self._models, batches, copy.deepcopy(self._pairs), label_array, None, trim)
        if label_array is not None and scored.samples != len(label_array):
            raise ConfigError(f"{shard.name}: labels hold {len(label_array)} entries, the data {scored.samples} sample(s)")
        scored.first_feed = None  # scores travel back, never activations
        return scored


def evaluate_on_ray(
    host: PluginHost,
    float_model: Any,
    quantized_model: Any,
    data: Any,
    *,
    labels: str | None = None,
    metrics: Sequence[Any] | None = None,
    batch_size: int | None = None,
    providers: Sequence[Any] | None = None,
    latency_runs: int | None = None,
    intra_op_threads: int = 1,
    address: str | None = None,
    workers: int | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """:func:`ortq.tools.evaluate.evaluate` with the shards of ``data`` scored on Ray workers.

    Metrics are merged in shard order (:meth:`ortq.core.metric.Metric.merge`), so the result is the same
    whatever order the shards finish in, and equals one process's up to floating-point summation order.
    ``labels`` must name an array inside each shard (a label file cannot be split across shards). Sizes
    and latency are measured here, on the first shard's first sample, as :func:`evaluate` does.
    """
    from ortq.io.data import iter_batches, model_inputs
    from ortq.io.model_io import read_model
    from ortq.tools.evaluate import (
        DEFAULT_LATENCY_RUNS, EvaluationReport, ModelPair, Scored, default_metrics, check_same_interface,
        finish_report, make_metric_pairs, model_session,
    )

    if labels is not None and not isinstance(labels, str):
        raise ConfigError("with Ray, labels must be the name of an array inside each shard")
    import_ray()
    float_loaded, quant_loaded = read_model(float_model), read_model(quantized_model)
    names = (str(float_model) if isinstance(float_model, (str, os.PathLike)) else "float model",
             str(quantized_model) if isinstance(quantized_model, (str, os.PathLike)) else "quantized model")
    check_same_interface(float_loaded.model, quant_loaded.model, *names)
    specs = list(metrics) if metrics is not None else default_metrics(float_loaded.model, labels is not None)
    pairs = make_metric_pairs(host, specs)  # unknown metrics and bad options fail here, not on a worker
    needing = [label for label, metric, _ in pairs if metric.needs_labels]
    if needing and labels is None:
        raise ConfigError(f"metric(s) {needing} compare with labels; name the label array inside the shards")
    unmergeable = [label for label, metric, _ in pairs if type(metric).merge is Metric.merge]
    if unmergeable:
        raise ConfigError(f"metric(s) {unmergeable} cannot combine results from several workers (no merge()); "
                          "evaluate without --ray")
    results: dict[int, Scored] = {}
    with _ray_session(address, workers) as (ray, count):
        shards = shards_of(data, count)
        refs = (ray.put(float_loaded.model.SerializeToString()), ray.put(quant_loaded.model.SerializeToString()))
        pool = _pool(ray, _EvaluationWorker, min(count, len(shards)), retries, *refs, pairs, names,
                     list(providers) if providers else None, intra_op_threads)
        _dispatch(ray, pool, shards,
                  lambda worker, shard: worker.score.options(retry_exceptions=True).remote(shard, labels, batch_size),
                  results.__setitem__, "evaluation", retries, progress)
    scored = Scored(make_metric_pairs(host, specs))
    for index in sorted(results):
        scored.merge(results[index])
    inputs = model_inputs(float_loaded.model)
    sessions = ModelPair(model_session(float_loaded.model, names[0], providers, intra_op_threads),
                         model_session(quant_loaded.model, names[1], providers, intra_op_threads),
                         [o.name for o in float_loaded.model.graph.output], *names)
    first_source = shards[0].source
    if not _is_ray_dataset(first_source):
        from ortq.tools.evaluate import resolve_labels

        _, first_source = resolve_labels(labels, first_source) if labels is not None else (None, first_source)
        scored.first_feed = next(iter(iter_batches(first_source, inputs, batch_size)), None)
    trim = not any(spec.shape and spec.shape[0] is not None for spec in inputs)
    report = EvaluationReport(names[0], names[1], intra_op_threads=intra_op_threads)
    runs = DEFAULT_LATENCY_RUNS if latency_runs is None else latency_runs
    return finish_report(report, scored, float_loaded, quant_loaded, sessions, runs, trim)


class _MapWorker:
    """A Ray actor holding what ``setup()`` built (a session, a toolkit, an evaluation set), reused per item."""

    def __init__(self, setup: Callable[[], Any]) -> None:
        self._state = setup()

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        return fn(self._state, item)


def map_on_ray(
    setup: Callable[[], Any],
    fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    names: Sequence[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    retries: int = DEFAULT_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    what: str = "trial",
) -> list[Any]:
    """``[fn(setup(), item) for item in items]`` on Ray workers, each calling ``setup()`` once; in item order.

    ``setup`` and ``fn`` must be picklable (module-level functions, or objects of importable classes).
    The independent trials of the accuracy-driven search run through this.
    """
    results: dict[int, Any] = {}
    with _ray_session(address, workers) as (ray, count):
        setup_ref, fn_ref = ray.put(setup), ray.put(fn)
        pool = _pool(ray, _MapWorker, min(count, max(1, len(items))), retries, setup_ref)
        shards = [Shard(name, item) for name, item in zip(names, items)]
        _dispatch(ray, pool, shards, lambda worker, shard: worker.run.options(retry_exceptions=True).remote(fn_ref, shard.source),
                  results.__setitem__, what, retries, progress)
    return [results[i] for i in range(len(items))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray prefixes the remote traceback; the cause's own message is the last line.
    return text[-1] if text else type(exc).__name__
