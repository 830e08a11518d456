"""The facade: :class:`Toolkit`, a plugin host whose methods run the pipeline and the tools.

An embedding SDK creates one (``ortq.Toolkit(plugins=[...], autoload=False)``); the module-level
functions in :mod:`ortq` create a fresh one per call. Each method is a thin call into the stage or tool
that does the work, so the facade is the only module that knows all of them.
"""

from __future__ import annotations

from typing import Any

from ortq.host.plugin_host import PluginHost
from ortq.pipeline.run import calibrate, plan_only, quantize, quantize_dynamic
from ortq.tools.accuracy_driven import quantize_to_target
from ortq.tools.distributed import calibrate_on_ray, evaluate_on_ray, quantize_on_ray
from ortq.tools.evaluate import EvaluationReport, evaluate
from ortq.tools.qat import quantize_qat

__all__ = ["Toolkit"]


class Toolkit(PluginHost):
    """A quantization toolkit with its own plugins; the object an embedding SDK creates.

    ``plugins`` are extra plugin objects (modules or instances with ``@ortq.hookimpl`` methods).
    ``autoload`` loads third-party plugins from the ``ortq`` entry-point group; ``builtins=False`` starts
    from an empty toolkit (useful to test a plugin alone). ``on_plugin_error="skip"`` logs a broken plugin
    and goes on instead of raising.
    """

    def quantize(self, model: Any, output: Any = None, *, ray: bool | str = False, ray_workers: int | None = None,
                 **options: Any):  # noqa: ANN201 - see pipeline
        """Quantize ``model``; see :func:`ortq.pipeline.run.quantize` for the options.

        ``ray=True`` (a local Ray, or the one this process already initialised) or ``ray="ADDRESS"``
        calibrates on a Ray cluster, shard by shard (:func:`ortq.tools.distributed.quantize_on_ray`).
        """
        if ray:
            return quantize_on_ray(
                self, model, output, options.pop("calibration_data", None), address=None if ray is True else ray,
                workers=ray_workers, **options,
            )
        return quantize(self, model, output, **options)

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
