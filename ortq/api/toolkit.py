"""The facade: :class:`Toolkit`, a plugin host whose methods run the pipeline and the tools.

An embedding SDK creates one (``ortq.Toolkit(plugins=[...], autoload=False)``); the module-level
functions in :mod:`ortq` create a fresh one per call. Each method is a thin call into the stage or tool
that does the work, so the facade is the only module that knows all of them.
"""

from __future__ import annotations

import logging
from typing import Any

from ortq.core.errors import ConfigError, VerificationError
from ortq.host.plugin_host import PluginHost
from ortq.pipeline.run import SCHEME_OPTIONS, calibrate, plan_only, quantize, quantize_dynamic
from ortq.pipeline.verify import LOW_SQNR_DB
from ortq.tools.accuracy_driven import AccuracyTarget, quantize_to_target
from ortq.tools.distributed import calibrate_on_ray, evaluate_on_ray, quantize_on_ray
from ortq.tools.evaluate import EvaluationReport, evaluate
from ortq.tools.qat import quantize_qat

__all__ = ["Toolkit", "SQNR_FLOOR_DB"]

log = logging.getLogger(__name__)

#: The verified output SQNR (dB, on the calibration samples) below which :meth:`Toolkit.quantize` does not accept
#: its model: it keeps the most damaging tensors in higher precision until the floor holds (docs/accuracy.md).
SQNR_FLOOR_DB = LOW_SQNR_DB
#: Ranking trials the automatic fallback may spend (the explicit accuracy-driven search defaults to 64).
_FALLBACK_RANK_TRIALS = 24
#: Options of :func:`ortq.pipeline.run.quantize` the accuracy-driven search takes as well.
_SEARCH_OPTIONS = SCHEME_OPTIONS | {"batch_size", "max_samples", "image_options", "providers"}


class Toolkit(PluginHost):
    """A quantization toolkit with its own plugins; the object an embedding SDK creates.

    ``plugins`` are extra plugin objects (modules or instances with ``@ortq.hookimpl`` methods).
    ``autoload`` loads third-party plugins from the ``ortq`` entry-point group; ``builtins=False`` starts
    from an empty toolkit (useful to test a plugin alone). ``on_plugin_error="skip"`` logs a broken plugin
    and goes on instead of raising.
    """

    def quantize(self, model: Any, output: Any = None, *, ray: bool | str = False, ray_workers: int | None = None,
                 sqnr_floor: float | None = SQNR_FLOOR_DB, strict: bool = False,
                 **options: Any):  # noqa: ANN201 - see pipeline
        """Quantize ``model``; see :func:`ortq.pipeline.run.quantize` for the options.

        ``ray=True`` (a local Ray, or the one this process already initialised) or ``ray="ADDRESS"``
        calibrates on a Ray cluster, shard by shard (:func:`ortq.tools.distributed.quantize_on_ray`).

        Never a silently useless model: when the verified output SQNR is below ``sqnr_floor`` (dB, default
        :data:`SQNR_FLOOR_DB`; None turns the check off), the model is quantized again keeping the most damaging
        tensors in higher precision, 16-bit first and float if 16 bits do not reach the floor (the accuracy-driven
        search, :func:`ortq.tools.accuracy_driven.quantize_to_target`, scored by output SQNR on the calibration
        data). What was kept is logged and listed in the result's ``fallback``. With ``strict=True`` a floor
        still missed raises :class:`ortq.VerificationError` (after the best model found was written, so it can
        be inspected).
        """
        if ray:
            result = quantize_on_ray(
                self, model, output, options.pop("calibration_data", None), address=None if ray is True else ray,
                workers=ray_workers, **options,
            )
            return self._check_floor(result, sqnr_floor, strict, "the Ray path does not search for a fallback")
        result = quantize(self, model, output, **options)
        return self._hold_floor(model, output, result, sqnr_floor, strict, options)

    def _hold_floor(self, model: Any, output: Any, result: Any, floor: float | None, strict: bool,
                    options: dict[str, Any]) -> Any:
        low = result.verification.min_sqnr_db
        if floor is None or low is None or low >= floor:
            return result
        why_not = None
        if options.get("calibration_data") is None:
            why_not = "it needs calibration data (a calibration state was given)"
        elif options.get("tensor_overrides") is not None:
            why_not = "tensor overrides were given"
        if why_not is not None:
            return self._check_floor(result, floor, strict, why_not)
        log.warning(
            "output SQNR %.1f dB is below the floor of %g dB: searching for the fewest tensors to keep in higher "
            "precision (16-bit first, float last)", low, floor,
        )
        search = {k: v for k, v in options.items() if k in _SEARCH_OPTIONS and v is not None}
        found = None
        for fallback in ("16bit", "float"):
            try:
                found = quantize_to_target(
                    self, model, output, target=AccuracyTarget("sqnr", min_value=floor),
                    calibration_data=options["calibration_data"], backend=options.get("target", "cpu"),
                    fallback=fallback, max_rank_trials=_FALLBACK_RANK_TRIALS, **search,
                )
            except ConfigError as exc:  # 16-bit needs 8-bit activations to widen
                log.info("fallback %s not available: %s", fallback, exc)
                continue
            if found.met:
                break
        if found is None:
            return self._check_floor(result, floor, strict, "no fallback applies to this scheme")
        final = found.result
        final.fallback = found.summary().splitlines()
        for line in final.fallback:
            log.warning("%s", line)
        if found.met:
            return final
        message = (f"the quantized model's output SQNR {found.final_value:.1f} dB stays below the floor of {floor:g} "
                   "dB even with its most damaging tensors in higher precision")
        if strict:
            raise VerificationError(message)
        log.warning("%s", message)
        return final

    @staticmethod
    def _check_floor(result: Any, floor: float | None, strict: bool, why: str) -> Any:
        low = result.verification.min_sqnr_db
        if floor is None or low is None or low >= floor:
            return result
        message = f"the quantized model's output SQNR {low:.1f} dB is below the floor of {floor:g} dB ({why})"
        if strict:
            raise VerificationError(message)
        log.warning("%s", message)
        return result

    def quantize_dynamic(self, model: Any, output: Any = None, **options: Any):  # noqa: ANN201 - see pipeline
        """Dynamically quantize ``model`` (no calibration); see :func:`ortq.pipeline.run.quantize_dynamic`."""
        return quantize_dynamic(self, model, output, **options)

    def quantize_to_target(self, model: Any, output: Any = None, **options: Any):  # noqa: ANN201
        """Static quantization that keeps the fewest sensitive tensors float until an accuracy target holds;
        see :func:`ortq.tools.accuracy_driven.quantize_to_target`."""
        return quantize_to_target(self, model, output, **options)

    def quantize_qat(self, model: Any, output: Any = None, **options: Any):  # noqa: ANN201 - see ortq.tools.qat
        """Validate and complete an already quantized (QAT) model; see :func:`ortq.tools.qat.quantize_qat`."""
        return quantize_qat(self, model, output, **options)

    def calibrate(self, model: Any, calibration_data: Any, *, ray: bool | str = False, ray_workers: int | None = None,
                  **options: Any):  # noqa: ANN201
        """Run calibration only and return a :class:`ortq.CalibrationState`; see :func:`ortq.pipeline.run.calibrate`.

        ``ray`` as in :meth:`quantize`: shards of ``calibration_data`` are observed on a Ray cluster.
        """
        if ray:
            return calibrate_on_ray(
                self, model, calibration_data, address=None if ray is True else ray, workers=ray_workers, **options
            )
        return calibrate(self, model, calibration_data, **options)

    def evaluate(self, float_model: Any, quantized_model: Any, data: Any, *, ray: bool | str = False,
                 ray_workers: int | None = None, **options: Any) -> EvaluationReport:
        """Score both models on ``data`` with metric plugins; see :func:`ortq.tools.evaluate.evaluate`.

        ``ray`` as in :meth:`quantize`: the shards of ``data`` are scored on a Ray cluster
        (:func:`ortq.tools.distributed.evaluate_on_ray`).
        """
        if ray:
            return evaluate_on_ray(self, float_model, quantized_model, data, address=None if ray is True else ray,
                                   workers=ray_workers, **options)
        return evaluate(self, float_model, quantized_model, data, **options)

    def plan(self, model: Any, **options: Any):  # noqa: ANN201
        """Plan without calibrating: which nodes would be quantized and why not; see ``ortq info``."""
        return plan_only(self, model, **options)
