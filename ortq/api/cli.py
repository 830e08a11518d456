"""The ``ortq`` command line. The only place that reads environment switches, prints, or exits.

Environment (CLI only, never the library, so an embedding SDK cannot pick them up by accident):
``ORTQ_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry-point plugins; ``ORTQ_PLUGINS=a,b`` loads only those
entry points.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from ortq.tools.debug import DEFAULT_SORT, SORT_KEYS
from ortq.core.errors import OrtqError
from ortq.api.toolkit import Toolkit

__all__ = ["main", "build_cli"]

log = logging.getLogger("ortq")

_TYPES = click.Choice(["uint8", "int8", "uint16", "int16"], case_sensitive=False)


class _Group(click.Group):
    """Turns ortq's own errors into one line and a non-zero exit; ``--verbose`` adds the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from ortq.api.cli_output import WarningSummary

        # ortq's warnings wait until the command is done (never on top of a progress bar), one line per kind.
        warnings = WarningSummary(lambda line: click.echo(line, err=True), verbose=bool(ctx.params.get("verbose")))
        warnings.attach(logging.getLogger("ortq"))
        succeeded = False
        try:
            result = super().invoke(ctx)
            succeeded = True
            return result
        except click.exceptions.Exit as exc:
            succeeded = exc.exit_code == 0
            raise
        except (click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C: nothing was written (outputs are renamed into place at the end)
            click.echo("Aborted!", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `ortq info m.onnx | head -3`: the reader has all it wanted
            _quiet_stdout()
            ctx.exit(0)
        except OrtqError as exc:
            _fail(ctx, f"Error: {exc}", exc)
        except Exception as exc:  # a bug: still one line unless --verbose
            _fail(ctx, f"Error: internal error ({type(exc).__name__}: {exc}); rerun with --verbose for the traceback", exc)
        finally:
            warnings.detach(flush=succeeded)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test runner's capture): nothing to flush
        pass


def _fail(ctx: click.Context, message: str, exc: BaseException) -> None:
    if (ctx.obj or {}).get("verbose"):
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(message, err=True)
    ctx.exit(1)


def _outputs_first(outputs: list[Path | None], inputs: dict[str, Any], models: tuple[Any, ...] = ()) -> None:
    """Before any work: every output can be written and none is a file the command reads."""
    from ortq.io.model_io import check_output_path
    from ortq.io.paths import refuse_overwriting_inputs

    written = [p for p in outputs if p is not None and str(p) != "-"]
    for path in written:
        check_output_path(path)
    refuse_overwriting_inputs(written, inputs, models=models)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _key_values(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _image_flags(command: Any) -> Any:
    """How a folder of images becomes the input (defaults come from the model's input shape)."""
    options = [
        click.option("--image-size", default=None, metavar="HxW", help="Input image size, e.g. 224x224."),
        click.option("--image-resize", type=click.Choice(["resize", "shorter-side-crop"]), default=None),
        click.option("--image-layout", type=click.Choice(["NCHW", "NHWC"]), default=None),
        click.option("--image-scale", type=float, default=None, help="Pixel multiplier before mean/std (default 1/255)."),
        click.option("--image-mean", default=None, metavar="M[,M,M]"),
        click.option("--image-std", default=None, metavar="S[,S,S]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _make_image_options(image_size: str | None, image_resize: str | None, image_layout: str | None,
                        image_scale: float | None, image_mean: str | None, image_std: str | None) -> Any:
    if not any(v is not None for v in (image_size, image_resize, image_layout, image_scale, image_mean, image_std)):
        return None
    from ortq.io.images import ImageOptions

    def floats(text: str) -> float | tuple[float, ...]:
        values = tuple(float(v) for v in text.split(","))
        return values[0] if len(values) == 1 else values

    kwargs: dict[str, Any] = {}
    if image_size:
        height, _, width = image_size.lower().partition("x")
        kwargs["size"] = (int(height), int(width or height))
    if image_resize:
        kwargs["resize"] = image_resize
    if image_layout:
        kwargs["layout"] = image_layout
    if image_scale is not None:
        kwargs["scale"] = image_scale
    if image_mean:
        kwargs["mean"] = floats(image_mean)
    if image_std:
        kwargs["std"] = floats(image_std)
    try:
        return ImageOptions(**kwargs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_ACCURACY_FLAGS = ("min_sqnr", "max_drop", "metric", "eval_data", "labels", "max_rank_trials", "fallback")


def _accuracy_flags(command: Any) -> Any:
    """Accuracy-driven quantization: keep the most damaging tensors float until the target holds."""
    options = [
        click.option("--min-sqnr", type=float, default=None, help="Accuracy target: output SQNR (dB) at least this."),
        click.option("--max-drop", type=float, default=None,
                     help="Accuracy target: --metric may drop at most this much from the float model's score."),
        click.option("--metric", default="top1", show_default=True,
                     help="Metric plugin for --max-drop, as name or name:key=value,... (see `ortq plugins`)."),
        click.option("--eval-data", type=click.Path(path_type=Path), default=None,
                     help="Held-out data to score trials on (default: the calibration data, which flatters)."),
        click.option("--labels", default=None, metavar="FILE|NAME",
                     help="Labels of the evaluation samples (.npy/.npz file, or an array's name in the --eval-data "
                          ".npz), for label metrics such as accuracy."),
        click.option("--max-rank-trials", type=click.IntRange(min=1), default=64, show_default=True,
                     help="At most this many tensors are ranked by a trial each (the rest by injected noise)."),
        click.option("--fallback", type=click.Choice(["float", "16bit"]), default="float", show_default=True,
                     help="What a kept tensor becomes: float, or 16-bit with the weights around it (for targets "
                          "with 16-bit kernels; ONNX Runtime's CPU provider has none, float is faster there)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _accuracy_target(min_sqnr: float | None, max_drop: float | None, metric: str, eval_data: Path | None,
                     labels: str | None, max_rank_trials: int, fallback: str) -> Any:
    if min_sqnr is None and max_drop is None:
        if eval_data is not None or labels is not None or fallback != "float":
            raise click.UsageError(
                "--eval-data/--labels/--fallback are for accuracy-driven quantization (--min-sqnr or --max-drop)")
        return None
    if min_sqnr is not None and max_drop is not None:
        raise click.UsageError("give one accuracy target: --min-sqnr or --max-drop")
    from ortq.tools.accuracy_driven import AccuracyTarget
    from ortq.tools.evaluate import parse_metric_spec

    if min_sqnr is not None:
        target = AccuracyTarget("sqnr", min_value=min_sqnr)
    else:
        name, options = parse_metric_spec(metric)
        target = AccuracyTarget(name, max_drop=max_drop, metric_options=options)
    return target, eval_data, labels, max_rank_trials, fallback


def _session_options(command: Any) -> Any:
    """The calibration session's execution providers and threads (observers work on any provider)."""
    command = click.option("--provider", multiple=True, metavar="NAME",
                           help="ONNX Runtime execution provider for calibration, in priority order; repeatable.")(command)
    return click.option("--intra-op-threads", type=click.IntRange(min=0), default=None,
                        help="Threads per operator in the calibration session (0: ONNX Runtime's default).")(command)


def _ray_flags(command: Any) -> Any:
    """Calibrate on a Ray cluster (the ``ray`` extra): each shard of the data folder on a worker."""
    command = click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                           help="Calibrate on Ray, one shard (each *.npz or sub-folder of -d) per task: a local Ray, "
                                "or the cluster at ADDRESS ('auto': the one this machine is in). Needs ortq[ray].")(command)
    return click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                        help="Ray workers (default: the cluster's CPUs, at most one per shard).")(command)


def _ray_call(ray_address: str | None, ray_workers: int | None) -> dict[str, Any]:
    """The facade's ``ray``/``ray_workers`` keywords for these flags, and a shards progress bar."""
    if ray_address is None:
        return {}
    bar = click.progressbar(length=0, label="calibrating shards", file=sys.stderr, show_pos=True,
                            hidden=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.length = total
        bar.update(1)

    return {"ray": True if ray_address == "local" else ray_address, "ray_workers": ray_workers, "progress": progress}


def _make_session_options(intra_op_threads: int | None) -> Any:
    if intra_op_threads is None:
        return None
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return so


def _progress(calibration_data: Path | None, max_samples: int | None) -> Any:
    from ortq.io.data import count_samples

    total = count_samples(calibration_data, max_samples) if calibration_data is not None else 0
    # Only on a terminal: in a pipeline or a CI log the label would be a stray line before the result or error.
    return click.progressbar(length=total or 0, label="calibrating", file=sys.stderr, show_pos=True,
                             hidden=not sys.stderr.isatty())


def _quantize_progress(calibration_data: Path | None, max_samples: int | None) -> tuple[Any, dict[str, Any]]:
    """A "calibrating" bar, then a "verifying" one (verification uses the first 64 calibration samples)."""
    from ortq.api.cli_output import StagedProgress
    from ortq.io.data import count_samples

    total = (count_samples(calibration_data, max_samples) if calibration_data is not None else 0) or 0
    bars = StagedProgress(hidden=not sys.stderr.isatty())
    return bars, {"progress": bars.stage("calibrating", total),
                  "verify_progress": bars.stage("verifying", min(total, 64))}


def build_cli(toolkit: Toolkit) -> click.Group:
    """The command group for ``toolkit``, with plugin commands added through ``ortq_register_commands``."""

    broken = toolkit.broken_plugins()

    @click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
                 epilog="\b\nSkipped broken plugins:\n" + "\n".join(f"  {_skipped(i)}" for i in broken) if broken else None)
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks on errors.")
    @click.option("--no-plugin", "no_plugin", multiple=True, metavar="NAME",
                  help="Do not load the plugin NAME (an entry point, as `ortq plugins` names it); repeatable. "
                       "ORTQ_DISABLE_PLUGIN_AUTOLOAD=1 skips every third-party plugin.")
    @click.version_option(package_name="ortq")
    @click.pass_context
    def cli(ctx: click.Context, verbose: bool, no_plugin: tuple[str, ...]) -> None:
        """Post-training quantization for ONNX models."""
        ctx.obj = {"verbose": verbose, "toolkit": toolkit}
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
        if ctx.invoked_subcommand not in ("plugins", "info"):  # those two list them in their output
            for info in broken:  # once per run, before any progress bar
                click.echo(f"Warning: {_skipped(info)}", err=True)

    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Quantized model to write.")
    @click.option("-d", "--calibration-data", type=click.Path(path_type=Path), default=None,
                  help=".npz file, or folder of <input>.npy / *.npz / sample folders of .npy or .pb tensors / images.")
    @click.option("-s", "--calibration-state", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Statistics saved by `ortq calibrate`, used instead of running the model.")
    @click.option("-t", "--target", default="cpu", show_default=True, help="Target backend (see `ortq plugins`).")
    @click.option("--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
                  help="static: QDQ from calibration data; dynamic: int8 weights, activations quantized at run "
                       "time (ONNX Runtime CPU; no calibration data; --calibration-data only verifies).")
    @click.option("--format", "quant_format", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True,
                  help="qdq: Q/DQ pairs around float ops; qoperator: integer kernels (QLinearConv, QGemm, ...) "
                       "in the file (static mode, cpu target).")
    @click.option("--calibrate-method", default=None, help="Calibrator name (default: the target's).")
    @click.option("--calibrator-option", multiple=True, metavar="KEY=VALUE", help="Option for the calibrator; repeatable.")
    @click.option("--activation-type", type=_TYPES, default=None)
    @click.option("--weight-type", type=_TYPES, default=None)
    @click.option("--per-channel/--per-tensor", default=None, help="Weight granularity (default: the target's).")
    @click.option("--activation-symmetric/--activation-asymmetric", default=None)
    @click.option("--weight-symmetric/--weight-asymmetric", default=None)
    @click.option("--reduce-range/--no-reduce-range", default=None, help="7-bit weights for CPUs without VNNI.")
    @click.option("--op-types", default=None, help="Comma-separated op types to quantize (default: the target's).")
    @click.option("--nodes-to-quantize", default=None, help="Comma-separated node names: quantize only these.")
    @click.option("--nodes-to-exclude", default=None, help="Comma-separated node names to keep in float.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Calibration batch size for dynamic batch axes.")
    @click.option("--max-samples", type=click.IntRange(min=1), default=None)
    @click.option("--extreme-range", type=float, default=None, help="Keep float any tensor whose |range| exceeds this.")
    @click.option("--bias-correction/--no-bias-correction", default=None,
                  help="Subtract the mean output shift of weight rounding from Conv/Gemm/MatMul biases.")
    @click.option("--weight-rounding", type=click.Choice(["none", "gptq"]), default=None,
                  help="gptq: round weights layer by layer against the calibration inputs' second moments (slower).")
    @click.option("--equalize/--no-equalize", default=None,
                  help="Cross-layer equalization of Conv pairs before calibration (helps per-tensor weights).")
    @click.option("--smooth-quant/--no-smooth-quant", default=None,
                  help="SmoothQuant: move MatMul/Gemm input outlier channels into the weights, folded into the op "
                       "before (reads the calibration data twice; see docs/algorithms.md).")
    @click.option("--smooth-quant-alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
                  help="Pin SmoothQuant's migration strength (implies --smooth-quant; default: chosen per tensor).")
    @click.option("--transformer-policy/--no-transformer-policy", default=None,
                  help="In transformer blocks quantize only MatMul/Gemm inputs and weights, keep the residual stream "
                       "float (default on for the cpu target; see docs/accuracy.md).")
    @click.option("--quantize-embeddings/--no-quantize-embeddings", default=None,
                  help="Store large Gather tables (word embeddings) in 8 bits (default on for the cpu target).")
    @click.option("--verify/--no-verify", default=True, show_default=True, help="Compare with the float model on calibration samples.")
    @click.option("--sqnr-floor", type=float, default=None, metavar="DB",
                  help="Below this verified output SQNR, keep the worst tensors in 16 bits (float last) until it holds "
                       "(default 15; 0 turns the fallback off).")
    @click.option("--strict", is_flag=True, default=False,
                  help="Exit non-zero when the output SQNR stays below the floor (the best model is still written).")
    @click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Option for the target backend; repeatable.")
    @click.option("--tensor-overrides", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="JSON file of per-tensor overrides in ONNX Runtime's TensorQuantOverrides format (quant_type, "
                       "scale + zero_point, symmetric, reduce_range, rmin, rmax, axis).")
    @_accuracy_flags
    @_session_options
    @_ray_flags
    @_image_flags
    @click.pass_context
    def quantize(ctx: click.Context, model: Path, output: Path, calibration_data: Path | None,
                 calibration_state: Path | None, target: str, mode: str, calibrate_method: str | None,
                 calibrator_option: tuple[str, ...], activation_type: str | None, weight_type: str | None, per_channel: bool | None,
                 activation_symmetric: bool | None, weight_symmetric: bool | None, reduce_range: bool | None, op_types: str | None,
                 nodes_to_quantize: str | None, nodes_to_exclude: str | None, batch_size: int | None, max_samples: int | None,
                 extreme_range: float | None, verify: bool, backend_option: tuple[str, ...], provider: tuple[str, ...],
                 intra_op_threads: int | None, quant_format: str, **image_flags: Any) -> None:
        """Quantize MODEL: statically to QDQ form (from calibration data or a saved calibration state), or
        dynamically (--mode dynamic) to ONNX Runtime's DynamicQuantizeMatMul without calibration."""
        target_spec = _accuracy_target(**{k: image_flags.pop(k) for k in _ACCURACY_FLAGS})
        sqnr_floor, strict = image_flags.pop("sqnr_floor"), image_flags.pop("strict")
        floor = {"strict": strict, **({"sqnr_floor": sqnr_floor or None} if sqnr_floor is not None else {})}
        tensor_overrides = image_flags.pop("tensor_overrides")
        corrections = {k: image_flags.pop(k) for k in ("bias_correction", "weight_rounding", "equalize",
                                                        "transformer_policy", "quantize_embeddings")}
        corrections.update({k: image_flags.pop(k) for k in ("smooth_quant", "smooth_quant_alpha")})
        on_ray = _ray_call(image_flags.pop("ray_address"), image_flags.pop("ray_workers"))
        if on_ray and (mode == "dynamic" or calibration_state is not None):
            raise click.UsageError("--ray calibrates static quantization from --calibration-data shards")
        if tensor_overrides is not None and (mode == "dynamic" or target_spec is not None):
            raise click.UsageError("--tensor-overrides applies to static quantization without --min-sqnr/--max-drop")
        if mode == "dynamic":
            if target_spec is not None:
                raise click.UsageError("--min-sqnr/--max-drop need static quantization (calibration data)")
            if target != "cpu":
                raise click.UsageError("--mode dynamic targets ONNX Runtime's CPU provider only (--target cpu)")
            if calibration_state is not None:
                raise click.UsageError("--calibration-state has no use in --mode dynamic")
            if quant_format != "qdq":
                raise click.UsageError("--format applies to static quantization; --mode dynamic writes ONNX Runtime's dynamic kernels")
            result = toolkit.quantize_dynamic(
                model, output, op_types_to_quantize=_csv(op_types), per_channel=bool(per_channel),
                reduce_range=bool(reduce_range), weight_type=weight_type or "int8",
                nodes_to_quantize=_csv(nodes_to_quantize), nodes_to_exclude=_csv(nodes_to_exclude),
                verify_data=calibration_data if verify else None, batch_size=batch_size,
                max_samples=max_samples or 64, providers=list(provider) or None,
            )
            click.echo(result.summary())
            click.echo(f"wrote {result.output}")
            return
        if (calibration_data is None) == (calibration_state is None) and not (
            tensor_overrides is not None and calibration_data is None  # given parameters may need no data
        ):
            raise click.UsageError("give exactly one of --calibration-data and --calibration-state")
        # What both the plain and the accuracy-driven run take: the scheme, the data reading, the target's options.
        options = dict(
            calibrate_method=calibrate_method, providers=list(provider) or None,
            backend_options=_key_values(backend_option) or None, image_options=_make_image_options(**image_flags),
            calibrator_options=_key_values(calibrator_option) or None, activation_type=activation_type,
            weight_type=weight_type, per_channel=per_channel, activation_symmetric=activation_symmetric,
            weight_symmetric=weight_symmetric, reduce_range=reduce_range, op_types_to_quantize=_csv(op_types),
            nodes_to_quantize=_csv(nodes_to_quantize), nodes_to_exclude=_csv(nodes_to_exclude), batch_size=batch_size,
            max_samples=max_samples, extreme_range=extreme_range, quant_format=quant_format, **corrections,
        )
        if target_spec is not None:
            accuracy, eval_data, labels, max_rank_trials, fallback = target_spec
            if calibration_state is not None:
                raise click.UsageError("--min-sqnr/--max-drop calibrate once themselves; give --calibration-data")
            on_ray.pop("progress", None)  # the search calibrates locally; its ranking trials run on Ray
            found = toolkit.quantize_to_target(
                model, output, target=accuracy, calibration_data=calibration_data, eval_data=eval_data,
                labels=labels, max_rank_trials=max_rank_trials, fallback=fallback, backend=target, **on_ray, **options,
            )
            click.echo(found.result.summary())
            click.echo(found.summary())
            click.echo(f"wrote {found.result.output}")
            if not found.met:
                raise OrtqError(f"the accuracy target {accuracy.describe()} was not met (best: {found.final_value:.4g})")
            return
        if on_ray:
            result = toolkit.quantize(
                model, output, calibration_data=calibration_data, target=target, verify=verify,
                tensor_overrides=tensor_overrides, **on_ray, **floor, **options,
            )
        else:
            bars, callbacks = _quantize_progress(calibration_data, max_samples)
            with bars:
                result = toolkit.quantize(
                    model, output, calibration_data=calibration_data, calibration_state=calibration_state,
                    target=target, session_options=_make_session_options(intra_op_threads), verify=verify,
                    tensor_overrides=tensor_overrides, **callbacks, **floor, **options,
                )
        click.echo(result.summary())
        click.echo(f"wrote {result.output}")
        for path in result.artifacts:
            click.echo(f"wrote {path}")

    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-d", "--calibration-data", required=True, type=click.Path(path_type=Path))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="State file (JSON) to write.")
    @click.option("-t", "--target", default="cpu", show_default=True)
    @click.option("--calibrate-method", default=None, help="Calibrator whose statistics to collect (histogram-based ones serve all).")
    @click.option("--calibrator-option", multiple=True, metavar="KEY=VALUE")
    @click.option("--op-types", default=None)
    @click.option("--nodes-to-exclude", default=None)
    @click.option("--batch-size", type=click.IntRange(min=1), default=None)
    @click.option("--max-samples", type=click.IntRange(min=1), default=None)
    @click.option("--merge", "merge_into", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Earlier state(s) of the same model to merge this run into; repeatable.")
    @_session_options
    @_ray_flags
    @_image_flags
    def calibrate(model: Path, calibration_data: Path, output: Path, target: str, calibrate_method: str | None,
                  calibrator_option: tuple[str, ...], op_types: str | None, nodes_to_exclude: str | None,
                  batch_size: int | None, max_samples: int | None, merge_into: tuple[Path, ...],
                  provider: tuple[str, ...], intra_op_threads: int | None, **image_flags: Any) -> None:
        """Run MODEL over calibration data and save the statistics (quantize later with --calibration-state)."""
        from ortq.io.state import CalibrationState

        _outputs_first([output], {"model": model, "calibration data": calibration_data, "state": list(merge_into)},
                       models=(model,))
        on_ray = _ray_call(image_flags.pop("ray_address"), image_flags.pop("ray_workers"))
        scheme = dict(
            target=target, calibrate_method=calibrate_method, calibrator_options=_key_values(calibrator_option) or None,
            op_types_to_quantize=_csv(op_types), nodes_to_exclude=_csv(nodes_to_exclude), batch_size=batch_size,
            max_samples=max_samples, providers=list(provider) or None,
        )
        if on_ray:
            state = toolkit.calibrate(model, calibration_data, **on_ray, **scheme)
        else:
            with _progress(calibration_data, max_samples) as bar:
                state = toolkit.calibrate(
                    model, calibration_data, session_options=_make_session_options(intra_op_threads),
                    image_options=_make_image_options(**image_flags), progress=bar.update, **scheme,
                )
        for path in merge_into:
            state.merge(CalibrationState.load(path, toolkit.statistic_types()))
        state.save(output)
        click.echo(f"{len(state.statistics)} tensor(s), {state.samples} sample(s) in {state.batches} batch(es), "
                   f"calibrator {state.calibrator}")
        click.echo(f"wrote {output}")

    @cli.command("merge-states")
    @click.argument("states", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
    def merge_states(states: tuple[Path, ...], output: Path) -> None:
        """Merge calibration states of the same model (shards of the data) into one."""
        from ortq.io.state import CalibrationState

        _outputs_first([output], {"state": list(states)})
        loaded = [CalibrationState.load(path, toolkit.statistic_types()) for path in states]
        merged = loaded[0]
        for other in loaded[1:]:
            merged.merge(other)
        merged.save(output)
        click.echo(f"merged {len(loaded)} state(s): {merged.samples} sample(s); wrote {output}")

    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-t", "--target", default="cpu", show_default=True)
    @click.option("--per-channel/--per-tensor", default=None)
    @click.option("--op-types", default=None, help="Comma-separated op types to quantize (default: the target's).")
    @click.option("--all-nodes", is_flag=True, help="List every float node, not only a summary per reason.")
    def info(model: Path, target: str, per_channel: bool | None, op_types: str | None, all_nodes: bool) -> None:
        """Show MODEL's opset and ops, and what would be quantized for a target (and why not)."""
        import onnx

        from ortq.io.data import model_inputs
        from ortq.io.model_io import load_model, model_opset

        proto, _ = load_model(model)
        click.echo(f"model: {model}")
        click.echo(f"opset: {model_opset(proto)}, IR version {proto.ir_version}, producer {proto.producer_name or '?'}")
        for spec in model_inputs(proto):
            dims = "?" if spec.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            click.echo(f"input: {spec.name} {spec.dtype} {dims}")
        for out in proto.graph.output:
            click.echo(f"output: {out.name} {onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)}")
        histogram = collections.Counter(n.op_type for n in proto.graph.node)
        click.echo("ops: " + ", ".join(f"{op} x{k}" for op, k in histogram.most_common()))
        plan, config, _ = toolkit.plan(proto, target=target, per_channel=per_channel, op_types_to_quantize=_csv(op_types))
        click.echo(
            f"target {target}: {len(plan.quantized_nodes)} node(s) would be quantized "
            f"({config.activation.qtype.value} activations, {config.weight.qtype.value} "
            f"{'per-channel' if config.per_channel else 'per-tensor'} weights), {len(plan.float_nodes)} stay float"
        )
        if all_nodes:
            for f in plan.float_nodes:
                click.echo(f"  float: {f.name} ({f.op_type}): {f.reason}")
        else:
            grouped = collections.defaultdict(list)
            for f in plan.float_nodes:  # by kind of reason: the tensor names in a reason would split every group
                grouped[(f.op_type, _reason_kind(f.reason))].append(f.name)
            for (op_type, reason), names in sorted(grouped.items()):
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                click.echo(f"  float {op_type} x{len(names)}: {reason} [{', '.join(names[:3])}{more}]")
        for broken_plugin in broken:
            click.echo(f"warning: {_skipped(broken_plugin)}")

    @cli.command()
    def plugins() -> None:
        """List loaded plugins, where they come from, and what each registers."""
        for info in toolkit.plugin_info.values():
            click.echo(f"{info.name}  [{info.source}]")
            if info.error:
                click.echo(f"  error: {info.error}")
            for kind, names in sorted(info.registered.items()):
                click.echo(f"  {kind.replace('_', ' ')}: {', '.join(names)}")
            if info.hooks:
                click.echo(f"  hooks: {', '.join(info.hooks)}")
        click.echo(f"targets: {', '.join(toolkit.backends.names())}")
        click.echo(f"calibrators: {', '.join(toolkit.calibrators.names())}")
        click.echo(f"metrics: {', '.join(toolkit.metrics.names())}")

    @cli.command()
    @click.argument("float_model", type=click.Path(dir_okay=False, path_type=Path))
    @click.argument("quantized_model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-d", "--data", required=True, type=click.Path(path_type=Path),
                  help="Evaluation data: .npz, or a folder as for --calibration-data.")
    @click.option("--labels", default=None, metavar="FILE|NAME",
                  help="Labels: a .npy/.npz file, or the name of an array in the data .npz (e.g. label).")
    @click.option("--metric", "metric_specs", multiple=True, metavar="NAME[:KEY=VALUE,...]",
                  help="Metric to report (see `ortq plugins`); repeatable. Default: top1, cosine, sqnr (+ accuracy with labels).")
    @click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
                  help="Also write the report as JSON to this file ('-': stdout, instead of the table).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None)
    @click.option("--max-samples", type=click.IntRange(min=1), default=None)
    @click.option("--latency-runs", type=click.IntRange(min=0), default=None,
                  help="Timed batch-1 runs per model, interleaved (0: skip latency).")
    @click.option("--provider", multiple=True, metavar="NAME", help="ONNX Runtime execution provider; repeatable.")
    @click.option("--intra-op-threads", type=click.IntRange(min=0), default=1, show_default=True)
    @_ray_flags
    @_image_flags
    def evaluate(float_model: Path, quantized_model: Path, data: Path, labels: str | None, metric_specs: tuple[str, ...],
                 json_path: Path | None, batch_size: int | None, max_samples: int | None, latency_runs: int | None,
                 provider: tuple[str, ...], intra_op_threads: int, **image_flags: Any) -> None:
        """Compare QUANTIZED_MODEL with FLOAT_MODEL on evaluation data: metrics, sizes, latency."""
        import json

        from ortq.tools.evaluate import DEFAULT_LATENCY_RUNS
        from ortq.io.model_io import write_file_atomic

        _outputs_first([json_path], {"float model": float_model, "quantized model": quantized_model, "data": data,
                                     "labels": labels}, models=(float_model, quantized_model))
        on_ray = _ray_call(image_flags.pop("ray_address"), image_flags.pop("ray_workers"))
        if on_ray and max_samples is not None:
            raise click.UsageError("--max-samples cannot be honoured across shards with --ray; choose the shards")
        options = dict(
            labels=labels, metrics=list(metric_specs) or None, batch_size=batch_size, providers=list(provider) or None,
            latency_runs=DEFAULT_LATENCY_RUNS if latency_runs is None else latency_runs,
            intra_op_threads=intra_op_threads,
        )
        if on_ray:
            report = toolkit.evaluate(float_model, quantized_model, data, **on_ray, **options)
        else:
            report = toolkit.evaluate(float_model, quantized_model, data, max_samples=max_samples,
                                      image_options=_make_image_options(**image_flags), **options)
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False)
        if str(json_path) == "-":
            click.echo(text)
            return
        click.echo(report.table())
        if json_path is not None:
            write_file_atomic(json_path, text + "\n")
            click.echo(f"wrote {json_path}")

    @cli.command()
    @click.argument("float_model", type=click.Path(dir_okay=False, path_type=Path))
    @click.argument("quantized_model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-d", "--data", required=True, type=click.Path(path_type=Path),
                  help="Inputs for both models (.npz or a folder, as for --calibration-data).")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write every tensor as JSON (ortq/schemas/debug-report.schema.json).")
    @click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write a self-contained HTML report (per-layer plot with the 'report' extra).")
    @click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="Rows to print (0: all).")
    @click.option("--sort", type=click.Choice(SORT_KEYS), default=DEFAULT_SORT, show_default=True,
                  help="injected: noise each tensor's own quantizer adds (finds the cause); sqnr: accumulated error.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None)
    @click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Samples to compare (default 128).")
    @click.option("--provider", multiple=True, metavar="NAME", help="ONNX Runtime execution provider; repeatable.")
    def debug(float_model: Path, quantized_model: Path, data: Path, json_path: Path | None, html_path: Path | None,
              top: int, sort: str, batch_size: int | None, max_samples: int | None, provider: tuple[str, ...]) -> None:
        """Compare QUANTIZED_MODEL with FLOAT_MODEL tensor by tensor and rank where the error comes from."""
        from ortq.tools.debug import DEFAULT_MAX_SAMPLES, debug_models
        from ortq.io.model_io import write_file_atomic

        _outputs_first([json_path, html_path], {"float model": float_model, "quantized model": quantized_model,
                                                "data": data}, models=(float_model, quantized_model))
        if json_path is not None and html_path is not None and json_path.resolve() == html_path.resolve():
            raise click.UsageError("--json and --html name the same file")
        report = debug_models(float_model, quantized_model, data, batch_size=batch_size,
                              max_samples=max_samples or DEFAULT_MAX_SAMPLES, providers=list(provider) or None)
        click.echo(report.table(top=top or None, sort=sort))
        for path, text in ((json_path, report.to_json(sort) if json_path else ""),
                           (html_path, report.to_html(sort) if html_path else "")):
            if path is not None:
                write_file_atomic(path, text + "\n")
                click.echo(f"wrote {path}")

    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Model to write.")
    @click.option("--opset", type=click.IntRange(min=13), default=None, help="Upgrade to this opset (default: at least 13).")
    @click.option("--dynamic-batch/--keep-batch", default=False, show_default=True, help="Make axis 0 of inputs and outputs symbolic.")
    @click.option("--shape-inference/--no-shape-inference", default=True, show_default=True)
    @click.option("--symbolic/--no-symbolic", default=True, show_default=True,
                  help="ONNX Runtime's symbolic shape inference where ONNX's leaves shapes unknown (needs sympy).")
    @click.option("--fold-constants/--no-fold-constants", default=True, show_default=True)
    @click.option("--fold-batch-norm/--no-fold-batch-norm", default=True, show_default=True)
    @click.option("--fold-add-bias/--no-fold-add-bias", default=True, show_default=True)
    @click.option("--ort-level", type=click.Choice(["none", "basic", "extended", "all"]), default="none", show_default=True,
                  help="ONNX Runtime graph optimizations; extended/all are refused (they fuse into ops quantizers cannot plan).")
    def preprocess(model: Path, output: Path, opset: int | None, dynamic_batch: bool, shape_inference: bool, symbolic: bool,
                   fold_constants: bool, fold_batch_norm: bool, fold_add_bias: bool, ort_level: str) -> None:
        """Prepare MODEL for quantization: opset, shapes, constant and BatchNormalization folding."""
        from ortq.tools.preprocess import preprocess as run_preprocess

        result = run_preprocess(
            model, output, opset=opset, dynamic_batch=dynamic_batch, shape_inference=shape_inference, symbolic=symbolic,
            fold_constants=fold_constants, fold_batch_norm=fold_batch_norm, fold_add_bias=fold_add_bias, ort_level=ort_level,
        )
        click.echo(result.summary())
        click.echo(f"wrote {result.output}")

    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Completed model to write.")
    @click.option("--format", "quant_format", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True)
    @click.option("-d", "--data", "verify_data", type=click.Path(path_type=Path), default=None,
                  help="Inputs (same forms as --calibration-data) to compare the output with the input model on.")
    @click.option("--keep-float-weights", is_flag=True,
                  help="Leave float weights float instead of quantizing them int8 per channel.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None)
    @click.option("--max-samples", type=click.IntRange(min=1), default=64, show_default=True)
    def qat(model: Path, output: Path, quant_format: str, verify_data: Path | None, keep_float_weights: bool,
            batch_size: int | None, max_samples: int) -> None:
        """Check and complete an already quantized (quantization-aware-trained) MODEL without re-quantizing it."""
        result = toolkit.quantize_qat(
            model, output, quant_format=quant_format, verify_data=verify_data,
            quantize_weights=not keep_float_weights, batch_size=batch_size, max_samples=max_samples,
        )
        click.echo(result.summary())
        click.echo(f"wrote {result.output}")

    # New built-in commands go above this line, one block each (preprocess, debug, evaluate, ...).

    @cli.group()
    def export() -> None:
        """Quantize for a deployment target and write what it needs (one command per target backend)."""

    for entry in toolkit.backends:
        export.add_command(_export_command(toolkit, entry.name, entry.value))

    for impl in toolkit.pm.hook.ortq_register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as exc:
            raise OrtqError(f"plugin {impl.plugin_name!r} failed to add its commands: {exc!r}") from exc
    return cli


def _export_command(toolkit: Toolkit, name: str, backend_cls: Any) -> click.Command:
    """``ortq export NAME``: built from the backend registry, so a plugin's target gets its command too."""

    @click.command(name=name, help=f"{backend_cls.description or name}: quantize MODEL and export to OUT_DIR.")
    @click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
    @click.option("-d", "--calibration-data", type=click.Path(path_type=Path), default=None)
    @click.option("-s", "--calibration-state", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.option("--calibrate-method", default=None)
    @click.option("--calibrator-option", multiple=True, metavar="KEY=VALUE")
    @click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help=f"Option for the {name} backend; "
                  f"repeatable. Options (default): {_backend_options_text(backend_cls)}.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None)
    @click.option("--max-samples", type=click.IntRange(min=1), default=None)
    @_image_flags
    def command(model: Path, out_dir: Path, calibration_data: Path | None, calibration_state: Path | None,
                calibrate_method: str | None, calibrator_option: tuple[str, ...], backend_option: tuple[str, ...],
                batch_size: int | None, max_samples: int | None, output_format: str | None = None,
                **image_flags: Any) -> None:
        if (calibration_data is None) == (calibration_state is None):
            raise click.UsageError("give exactly one of --calibration-data and --calibration-state")
        backend_options = _key_values(backend_option)
        if output_format is not None:
            if backend_options.get("format", output_format) != output_format:
                raise click.UsageError(
                    f"--format {output_format} and --backend-option format={backend_options['format']} disagree"
                )
            backend_options["format"] = output_format
        created = _make_folder(out_dir)
        try:
            bars, callbacks = _quantize_progress(calibration_data, max_samples)
            with bars:
                result = toolkit.quantize(
                    model, out_dir / f"{model.stem}.{name}.onnx", calibration_data=calibration_data,
                    calibration_state=calibration_state, target=name, calibrate_method=calibrate_method,
                    calibrator_options=_key_values(calibrator_option) or None,
                    backend_options=backend_options or None, batch_size=batch_size, max_samples=max_samples,
                    image_options=_make_image_options(**image_flags), **callbacks,
                )
        except BaseException:
            for folder in created:  # a failed export leaves no empty folder behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
        click.echo(result.summary())
        for path in [result.output, *result.artifacts]:
            click.echo(f"wrote {path}")

    formats = tuple(getattr(backend_cls, "output_formats", ()) or ())
    if formats:  # only backends that declare what they can write (Backend.output_formats) get --format
        at = next(i for i, p in enumerate(command.params) if p.name == "backend_option") + 1
        command.params.insert(at, click.Option(
            ["--format", "output_format"], type=click.Choice(formats, case_sensitive=False), default=None,
            help=f"What to write ({', '.join(formats)}; default: the target's own). The backend's format option.",
        ))
    return command


def _backend_options_text(backend_cls: Any) -> str:
    from ortq.host.plugin_host import option_names

    valid = option_names(backend_cls)
    if valid is None:
        return "see the backend's documentation"
    return ", ".join(f"{k} ({v})" for k, v in valid.items()) or "none"


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, innermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _reason_kind(reason: str) -> str:
    """A float node's reason with quoted (tensor, node) names replaced, so reasons of one kind group together."""
    import re

    return re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", reason)


def _skipped(info: Any) -> str:
    """One line for a plugin that failed to load: what failed and how to stop loading it."""
    how = f"--no-plugin {info.name}"
    if info.source.startswith("entry point"):
        how += " or ORTQ_DISABLE_PLUGIN_AUTOLOAD=1"
    return f"skipped {info.error} (to not load it: {how})"


def _disabled_plugins(argv: list[str]) -> list[str]:
    """The ``--no-plugin NAME`` values, read before click parses anything: plugins load before the commands
    exist (they add commands and targets)."""
    names = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--no-plugin" and i + 1 < len(argv):
            names.append(argv[i + 1])
        elif arg.startswith("--no-plugin="):
            names.append(arg.partition("=")[2])
    return names


def _toolkit_from_environment(disabled: list[str] | None = None) -> Toolkit:
    """The CLI's toolkit: a plugin that fails to load is skipped (and reported once by the command), so one
    broken package never takes down ``--help``, ``plugins`` or ``info``."""
    autoload = os.environ.get("ORTQ_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in {"1", "true", "yes"}
    only = _csv(os.environ.get("ORTQ_PLUGINS"))
    host_log = logging.getLogger("ortq.host.plugin_host")
    was_disabled, host_log.disabled = host_log.disabled, True  # the command reports skipped plugins itself
    try:
        return Toolkit(autoload=autoload, only_entry_points=only, on_plugin_error="skip", disabled=disabled or ())
    finally:
        host_log.disabled = was_disabled


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    try:
        cli = build_cli(_toolkit_from_environment(_disabled_plugins(args)))
    except OrtqError as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli.main(args=argv, prog_name="ortq")
