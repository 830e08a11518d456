"""ESP-DL's quantization toolkit API on ortq, so a script written for Espressif's tool runs unchanged.

Espressif's toolkit (ESP-DL v1.1, ``tools/quantization_tool``; documented in ``quantization-toolkit-overview.rst``
and ``quantization-toolkit-api.rst`` of ``espressif/esp-dl``) has three parts, kept here with their names and
arguments:

* ``optimizer``: BatchNormalization folding, Add-bias folding into Conv, dynamic batch
  (``optimizer.optimize(model, ['fuse_bn_into_conv', 'fuse_add_bias_into_conv'])``,
  ``optimizer.convert_model_batch_to_dynamic(model)``; ``optimizer(model)`` does all three);
* ``Calibrator(quantization_bit, granularity='per-tensor', calib_method='minmax')`` with ``set_providers``,
  ``set_method``, ``check_model``, ``generate_quantization_table(model_proto, calib_dataset, table_path)`` and
  ``export_coefficient_to_cpp(model_proto, table_path, target_chip, output_path, file_name,
  print_model_info=False)``, which writes ESP-DL v1.1's ``<name>_coefficient.hpp/.cpp`` and ``<name>_model.hpp``;
* ``Evaluator(quantization_bit, granularity, target_chip='esp32s3')`` with ``generate_quantized_model(model_proto,
  table_path)`` and ``evaluate_quantized_model(batch_fp_input, to_float=False)`` returning ``(outputs,
  output_names)``, simulated with the chip's integer arithmetic (:meth:`Esp32Backend.evaluate`).

One deliberate difference: Espressif's tool keeps the quantization table in a pickle file. Loading a pickle runs
whatever code it holds, and tables travel between people and machines, so ortq writes and reads JSON only (the
ortq calibration state of the model plus the chosen bits, granularity and method) and refuses a ``.pickle``
path, saying so. Name the table ``*.json``; everything else in such a script stays as it is.

Nothing here prints: ``print_model_info=True`` logs the layer summary at INFO level on this module's logger.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from ortq.api.toolkit import Toolkit
from ortq.core.errors import ConfigError, ModelError, OrtqError
from ortq.io.model_io import write_file_atomic
from ortq.io.state import CalibrationState
from ortq.plugins.backends.esp32 import Esp32Backend
from ortq.plugins.backends.esp32.chips import V1_CHIPS
from ortq.plugins.backends.esp32.codegen import report_text
from ortq.plugins.backends.esp32.optimizer import fold_add_bias, fold_batch_norm, make_batch_dynamic
from ortq.plugins.backends.esp32.qdq import QdqGraph

__all__ = ["Calibrator", "Evaluator", "optimizer", "convert_model_batch_to_dynamic", "TABLE_FORMAT"]

log = logging.getLogger(__name__)

TABLE_FORMAT = "ortq-esp-dl-quantization-table"
_TABLE_VERSION = 1
_BITS = {"int8": 8, "int16": 16}
_GRANULARITIES = ("per-tensor", "per-channel")
_METHODS = ("minmax", "entropy")


def convert_model_batch_to_dynamic(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model_proto`` whose inputs' and outputs' first axis is symbolic (ESP-DL's optimizer step)."""
    return make_batch_dynamic(_copy(model_proto))


class _Optimizer:
    """ESP-DL's optimizer step: what its ``optimizer.py`` does with onnxoptimizer's passes, on ortq's graph passes.
    Every call returns a new model; the one given is never modified."""

    PASSES = {"fuse_bn_into_conv": fold_batch_norm, "fuse_add_bias_into_conv": fold_add_bias}

    def optimize(self, model_proto: onnx.ModelProto, passes: Sequence[str] | None = None) -> onnx.ModelProto:
        """Run the named passes (both by default) in order."""
        model = _copy(model_proto)
        for name in passes if passes is not None else list(self.PASSES):
            try:
                model = self.PASSES[name](model)
            except KeyError:
                raise ConfigError(f"unknown optimizer pass {name!r}; ortq has {', '.join(self.PASSES)}") from None
        return model

    def convert_model_batch_to_dynamic(self, model_proto: onnx.ModelProto) -> onnx.ModelProto:
        return convert_model_batch_to_dynamic(model_proto)

    def __call__(self, model_proto: onnx.ModelProto) -> onnx.ModelProto:
        """The whole step: BatchNormalization folding, Add-bias folding, dynamic batch."""
        return make_batch_dynamic(self.optimize(model_proto))


#: ``from ortq.api.esp_dl import optimizer``; stateless.
optimizer = _Optimizer()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"expected an onnx.ModelProto (onnx.load(path)), got {type(model).__name__}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _scheme(quantization_bit: str, granularity: str, calib_method: str) -> tuple[int, bool, str]:
    if quantization_bit not in _BITS:
        raise ConfigError(f"quantization_bit must be 'int8' or 'int16', not {quantization_bit!r}")
    if granularity not in _GRANULARITIES:
        raise ConfigError(f"granularity must be 'per-tensor' or 'per-channel', not {granularity!r}")
    if calib_method not in _METHODS:
        raise ConfigError(f"calib_method must be 'minmax' or 'entropy', not {calib_method!r}")
    if quantization_bit == "int16" and (granularity, calib_method) != ("per-tensor", "minmax"):
        raise ConfigError("ESP-DL runs int16 with granularity='per-tensor' and calib_method='minmax' only")
    return _BITS[quantization_bit], granularity == "per-channel", calib_method


def _table_path(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() in (".pickle", ".pkl", ".pck"):
        raise ConfigError(
            f"{out}: ortq keeps the quantization table as JSON, not as a pickle: loading a pickle runs any code "
            f"inside it, and tables are shared between people and machines; name it e.g. {out.with_suffix('.json').name}"
        )
    return out


def _load_table(path: str | Path, toolkit: Toolkit) -> tuple[dict[str, Any], CalibrationState]:
    source = _table_path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such quantization table") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source}: not an ortq quantization table (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or data.get("version") != _TABLE_VERSION:
        raise ConfigError(f"{source}: not an ortq ESP-DL quantization table (format/version field missing or wrong)")
    state = CalibrationState.from_dict(data.get("state"), toolkit.statistic_types(), label=str(source))
    return data, state


class _Base:
    def __init__(self, quantization_bit: str, granularity: str, calib_method: str) -> None:
        self.bits, self.per_channel, self.method = _scheme(quantization_bit, granularity, calib_method)
        self.quantization_bit, self.granularity, self.calib_method = quantization_bit, granularity, calib_method
        self.providers: list[Any] | None = None
        self._toolkit = Toolkit(autoload=False)  # built-in plugins only: the same numbers wherever it runs

    def set_providers(self, providers: Sequence[Any]) -> None:
        """ONNX Runtime execution providers for running the float model (calibration)."""
        self.providers = list(providers)

    def check_model(self, model_proto: onnx.ModelProto, target_chip: str = "esp32s3") -> int:
        """0 if ``target_chip`` can run ``model_proto`` after quantization, -1 (logging the reason) if not."""
        try:
            backend = Esp32Backend(chip=target_chip, bits=self.bits, format="cpp")
            from ortq.pipeline.run import plan_only

            plan, _, _ = plan_only(self._toolkit, model_proto, target=target_chip, **self._options())
            refused = [f"node {f.name!r} ({f.op_type}): {f.reason}" for f in plan.float_nodes]
            if refused:
                log.warning("the model is incompatible with %s: %s", backend.spec.chip, "; ".join(refused))
                return -1
        except (OrtqError, ValueError) as exc:
            log.warning("the model is incompatible: %s", exc)
            return -1
        return 0

    def _options(self) -> dict[str, Any]:
        return {"per_channel": self.per_channel, "calibrate_method": self.method,
                "backend_options": {"bits": self.bits, "format": "cpp"}}

    def _quantize(self, model_proto: onnx.ModelProto, table_path: str | Path, target_chip: str):  # noqa: ANN202
        data, state = _load_table(table_path, self._toolkit)
        if (data.get("quantization_bit"), data.get("granularity")) != (self.quantization_bit, self.granularity):
            raise ConfigError(
                f"{table_path}: the table was made for {data.get('quantization_bit')} {data.get('granularity')}, "
                f"not {self.quantization_bit} {self.granularity}"
            )
        if target_chip not in V1_CHIPS:
            raise ConfigError(f"target_chip must be one of {', '.join(V1_CHIPS)} (ESP-DL v1.1), not {target_chip!r}")
        return self._toolkit.quantize(
            model_proto, calibration_state=state, target=target_chip, verify=False, providers=self.providers,
            **self._options(),
        )


class Calibrator(_Base):
    """ESP-DL's ``Calibrator``: calibrate a float model into a quantization table, export C++ coefficients."""

    def __init__(self, quantization_bit: str, granularity: str = "per-tensor", calib_method: str = "minmax") -> None:
        super().__init__(quantization_bit, granularity, calib_method)

    def set_method(self, granularity: str, calib_method: str) -> None:
        self.bits, self.per_channel, self.method = _scheme(self.quantization_bit, granularity, calib_method)
        self.granularity, self.calib_method = granularity, calib_method

    def generate_quantization_table(self, model_proto: onnx.ModelProto, calib_dataset: Any, table_path: str | Path) -> Path:
        """Calibrate ``model_proto`` on ``calib_dataset`` (an array batch for a one-input model, or a dict of
        arrays by input name) and write the table to ``table_path`` (JSON; a ``.pickle`` path is refused)."""
        out = _table_path(table_path)
        model = _copy(model_proto)
        feeds = calib_dataset
        if isinstance(calib_dataset, np.ndarray):
            inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
            if len(inputs) != 1:
                raise ConfigError(f"the model has {len(inputs)} inputs; give calib_dataset as a dict by input name")
            feeds = {inputs[0]: calib_dataset}
        state = self._toolkit.calibrate(
            model, feeds, target="esp32s3", providers=self.providers, **self._options(),
        )
        table = {
            "format": TABLE_FORMAT, "version": _TABLE_VERSION, "quantization_bit": self.quantization_bit,
            "granularity": self.granularity, "calib_method": self.calib_method, "state": state.to_dict(),
        }
        return write_file_atomic(out, json.dumps(table, separators=(",", ":"), allow_nan=True))

    def export_coefficient_to_cpp(
        self, model_proto: onnx.ModelProto, table_path: str | Path, target_chip: str, output_path: str | Path,
        file_name: str, print_model_info: bool = False,
    ) -> list[Path]:
        """Write ESP-DL v1.1's ``<name>_coefficient.hpp/.cpp`` and ``<name>_model.hpp`` (and a short report) to
        ``output_path``. ``file_name`` is the coefficient files' name as in Espressif's tool
        (``'mnist_coefficient'`` gives ``mnist_coefficient.hpp``); a name without ``_coefficient`` gets it added."""
        folder = Path(output_path)
        if not folder.is_dir():
            raise ConfigError(f"output_path {str(folder)!r} is not a folder")
        name = file_name[: -len("_coefficient")] if file_name.endswith("_coefficient") else file_name
        result = self._quantize(model_proto, table_path, target_chip)
        backend = Esp32Backend(chip=target_chip, bits=self.bits, model_name=name, format="cpp")
        written = backend.export(result, folder)
        if print_model_info:
            log.info("%s", report_text(QdqGraph(result.model, backend.spec), name, [p.name for p in written]))
        return written


class Evaluator(_Base):
    """ESP-DL's ``Evaluator``: the quantized model as the chip computes it, simulated on the host."""

    def __init__(self, quantization_bit: str, granularity: str, target_chip: str = "esp32s3") -> None:
        super().__init__(quantization_bit, granularity, "minmax")
        self.set_target_chip(target_chip)
        self._result = None

    def set_target_chip(self, target_chip: str) -> None:
        if target_chip not in V1_CHIPS:
            raise ConfigError(f"target_chip must be one of {', '.join(V1_CHIPS)} (ESP-DL v1.1), not {target_chip!r}")
        self.target_chip = target_chip
        self._backend = Esp32Backend(chip=target_chip, bits=self.bits, format="cpp")

    def generate_quantized_model(self, model_proto: onnx.ModelProto, table_path: str | Path) -> None:
        """Quantize ``model_proto`` with the table's ranges for the target chip."""
        self._result = self._quantize(model_proto, table_path, self.target_chip)
        self._backend.check_runnable(self._result)

    def evaluate_quantized_model(self, batch_fp_input: Any, to_float: bool = False) -> tuple[list[np.ndarray], list[str]]:
        """(outputs, output_names) of the quantized model on a float batch: integers (``to_float=False``, as the
        chip holds them) or their real values (``to_float=True``)."""
        if self._result is None:
            raise ModelError("call generate_quantized_model(model_proto, table_path) first")
        model = self._result.model
        feeds = batch_fp_input
        if isinstance(batch_fp_input, np.ndarray):
            inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
            feeds = {inputs[0]: batch_fp_input}
        outputs = self._backend.evaluate(self._result, feeds)
        names = list(outputs)
        if to_float:
            return [outputs[n] for n in names], names
        graph = QdqGraph(model, self._backend.spec)
        ints = []
        for n in names:
            e = graph.activation_exponent(n)
            ints.append(np.rint(outputs[n].astype(np.float64) * 2.0 ** -e).astype(self._backend.spec.ctype[:-2]))
        return ints, names
