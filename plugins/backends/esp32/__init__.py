"""The ``esp32`` target: Espressif chips running ESP-DL (``--backend-option chip=esp32|esp32s2|esp32s3|esp32c3|esp32p4``).

ESP-DL quantizes every tensor symmetrically to int8 or int16 with power-of-two scales
(``real = int * 2**exponent``; its quantization specification, sources in ``chips.py``), so the scheme
here is ``QuantSpec(int8|int16, symmetric=True, power_of_two=True)`` for activations and weights, weights
per-tensor by default (per-channel on ESP32-P4, per esp-ppq; ``per_channel=True`` asks for it on the v1.1
chips in int8, as ESP-DL's ``Calibrator('int8', 'per-channel')``), min/max calibration by default as ESP-DL's
``Calibrator`` (``--calibrate-method entropy`` works too).

Two firmware generations, two outputs (``chips.py`` says what each expects, ``docs/targets.md`` which runs
where):

* ESP-DL v1.1 (esp32, esp32s2, esp32s3, esp32c3; ``format=cpp``, their default): ``<name>_coefficient.hpp/.cpp``
  with v1.1's bias types and exponents, and ``<name>_model.hpp``, a ``dl::layer::Model`` subclass that builds
  the layers and runs them (``codegen.py``);
* ESP-DL v3 (esp32s3 and esp32p4; ``format=espdl``, P4's default and only choice): a ``.espdl`` model file.

Options (``--backend-option key=value``):

* ``chip``: ``esp32s3`` (default), ``esp32``, ``esp32s2``, ``esp32c3`` or ``esp32p4``;
* ``bits``: ``8`` (default) or ``16``;
* ``format``: ``cpp`` (ESP-DL v1.1) or ``espdl`` (ESP-DL v3), by chip as above;
* ``model_name``: the model name used for ``<name>_coefficient.hpp/.cpp`` and ``namespace
  <name>_coefficient`` (default: the output file's name up to its first dot, e.g. ``model`` for
  ``model.esp32.onnx``). Not ``name``: ``Toolkit.backend(name, **options)`` takes that for the target.

``prepare`` runs ESP-DL's optimizer step on the float model (``optimizer.py``: BatchNormalization and
Add-bias folding, dynamic batch). Only the ops in :data:`SUPPORTED_OPS` are quantized; ``leave_float``
vetoes the shapes ESP-DL has no kernel for (grouped but not depthwise convolutions, 1-D/3-D convolutions,
Gemm with scaling or transA, padded average pooling, ...), and ``export`` refuses any node left in float,
naming it, since the chip has no float path. ``export`` writes the C++ coefficient files (``codegen.py``)
and a short report; :meth:`Esp32Backend.evaluate` simulates the chip's integer arithmetic on the host
(``evaluator.py``), with the bias rule of the firmware the output is for.

User options that a shift-only target cannot run (asymmetric or unsigned types) are refused by
``check_config`` before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx

from ortq.core.backend import Backend
from ortq.core.config import QuantConfig
from ortq.core.errors import ConfigError, ModelError
from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import PlanContext
from ortq.core.scheme import QuantSpec, QuantType
from ortq.io.model_io import write_file_atomic

from ortq.plugins.backends.esp32.chips import ALL_CHIPS, ChipSpec, V1_CHIPS, V3_CHIPS, chip_spec
from ortq.plugins.backends.esp32.codegen import render, render_model, report_text
from ortq.plugins.backends.esp32.evaluator import SUPPORTED_OPS, EvaluationStats, evaluate_qdq
from ortq.plugins.backends.esp32.optimizer import fold_add_bias, fold_batch_norm, make_batch_dynamic, optimize_for_esp_dl
from ortq.plugins.backends.esp32.qdq import QdqGraph, c_identifier

if TYPE_CHECKING:
    from ortq.core.plan import QuantPlan
    from ortq.pipeline.run import QuantizationResult

__all__ = [
    "Esp32Backend",
    "SUPPORTED_OPS",
    "ChipSpec",
    "chip_spec",
    "evaluate_qdq",
    "EvaluationStats",
    "fold_batch_norm",
    "fold_add_bias",
    "make_batch_dynamic",
    "optimize_for_esp_dl",
]

log = logging.getLogger(__name__)

_CHIPS = ALL_CHIPS
FORMATS = {"cpp": "1.1", "espdl": "3"}


class Esp32Backend(Backend):
    name = "esp32"
    description = "Espressif ESP-DL: power-of-two int8/int16, v1.1 C++ coefficients and model class, or v3 .espdl"
    default_op_types = SUPPORTED_OPS
    #: ``ortq export esp32 --format cpp|espdl``; which one a chip runs is checked in ``__init__``.
    output_formats = tuple(FORMATS)

    def __init__(
        self, chip: str = "esp32s3", bits: int | str = 8, model_name: str | None = None, format: str | None = None,
    ) -> None:
        chip = str(chip).lower().replace("-", "")
        if chip not in _CHIPS:
            raise ValueError(f"chip must be one of {', '.join(_CHIPS)}, not {chip!r}")
        try:
            bits = int(bits)
        except (TypeError, ValueError):
            raise ValueError(f"bits must be 8 or 16, not {bits!r}") from None
        if format is None:
            format = "cpp" if chip in V1_CHIPS else "espdl"
        format = str(format).lower().lstrip(".")
        if format not in FORMATS:
            raise ValueError(f"format must be cpp (ESP-DL v1.1) or espdl (ESP-DL v3), not {format!r}")
        if format == "cpp" and chip not in V1_CHIPS:
            raise ValueError(
                f"{chip} has no ESP-DL v1.1 release (v1.1 runs on {', '.join(V1_CHIPS)}); use format=espdl (ESP-DL v3)"
            )
        if format == "espdl" and chip not in V3_CHIPS:
            raise ValueError(f"ESP-DL v3 (.espdl) runs on {', '.join(V3_CHIPS)}, not {chip}; use format=cpp (ESP-DL v1.1)")
        self.format = format
        self.spec = chip_spec(chip, bits, FORMATS[format])
        self.model_name = model_name

    # -- scheme ------------------------------------------------------------------------------------------
    def default_config(self) -> QuantConfig:
        qtype = QuantType.INT8 if self.spec.bits == 8 else QuantType.INT16
        spec = QuantSpec(qtype, symmetric=True, power_of_two=True)
        return QuantConfig(
            activation=spec, weight=spec, per_channel=self.spec.per_channel, quantize_bias=True,
            op_types=self.default_op_types, calibrator="minmax",
            # The firmware is fed int8/int16 at the input's exponent, so a model starting with a data-movement
            # op (Espressif's tutorial MNIST: a Reshape on the input) runs it on integers; there is no float path.
            quantize_graph_inputs=True,
        )

    def check_config(self, config: QuantConfig) -> None:
        if config.quant_format != "qdq":
            raise ConfigError(f"the esp32 targets need the QDQ format (the exporter reads Q/DQ), not {config.quant_format}")
        for role, spec in (("activations", config.activation), ("weights", config.weight)):
            if spec.qtype not in (QuantType.INT8, QuantType.INT16):
                raise ConfigError(f"the esp32 target runs int8 or int16 (signed) {role}, not {spec.qtype.value}")
            if not spec.symmetric or not spec.power_of_two:
                raise ConfigError(f"the esp32 target needs symmetric power-of-two {role}: ESP-DL has no zero points")
        if self.spec.v1 and config.per_channel and config.weight.qtype == QuantType.INT16:
            raise ConfigError(
                f"ESP-DL v1.1 runs int16 with per-tensor weights only ({self.spec.chip}); per-channel is int8 only"
            )

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return optimize_for_esp_dl(model)

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        return _unsupported_shape(node, ctx)

    # -- artifacts ---------------------------------------------------------------------------------------
    def check_plan(self, plan: QuantPlan, model: onnx.ModelProto) -> None:
        """Refuse before calibration: a node the plan already leaves float, or an op ESP-DL has no kernel
        for, would make the export fail after minutes of work (and a misleading low-SQNR warning)."""
        self._refuse(self._plan_refusals(plan, model))

    def _plan_refusals(self, plan: QuantPlan, model: onnx.ModelProto) -> list[str]:
        refused = []
        for fn in plan.float_nodes:
            if fn.op_type not in SUPPORTED_OPS:
                why = (
                    f"ESP-DL has no integer {fn.op_type} kernel this backend can export "
                    f"(supported: {', '.join(sorted(SUPPORTED_OPS))})"
                )
            else:
                why = fn.reason
            refused.append(f"node {fn.name!r} ({fn.op_type}) cannot run on {self.spec.chip}: {why}")
        for node in model.graph.node:
            if node.op_type not in SUPPORTED_OPS | {"QuantizeLinear", "DequantizeLinear", "Constant"}:
                msg = f"node {node.name!r} ({node.op_type}) cannot run on {self.spec.chip}: not a supported op"
                if not any(f"node {node.name!r}" in r for r in refused):
                    refused.append(msg)
        return refused

    @staticmethod
    def _refuse(refused: list[str]) -> None:
        if refused:
            more = f" (and {len(refused) - 1} more node(s))" if len(refused) > 1 else ""
            raise ModelError(refused[0] + more)

    def check_runnable(self, result: QuantizationResult) -> None:
        """Raise :class:`ortq.ModelError` naming the first node the chip cannot run."""
        self._refuse(self._plan_refusals(result.plan, result.model))
        graph = QdqGraph(result.model, self.spec)
        for layer in graph.layers().values():
            if layer.output_exponent is None:
                raise ModelError(
                    f"node {layer.kernel.name!r} ({layer.kernel.op_type}): its output is not quantized, "
                    f"so {self.spec.chip} cannot run it"
                )
        for out in result.model.graph.output:
            if graph.activation_exponent(out.name) is None:
                raise ModelError(f"model output {out.name!r} is not quantized; {self.spec.chip} has no float outputs")

    def coefficient_name(self, result: QuantizationResult) -> str:
        if self.model_name:
            base = self.model_name
        elif result.output is not None:
            base = Path(result.output).name.split(".")[0]
        else:
            base = result.model.graph.name or "model"
        return c_identifier(base, set())

    def export(self, result: QuantizationResult, out_dir: Path) -> list[Path]:
        self.check_runnable(result)
        out_dir = Path(out_dir)
        name = self.coefficient_name(result)
        graph = QdqGraph(result.model, self.spec)
        if self.format == "espdl":
            return self._export_espdl(result, out_dir, name)
        hpp, cpp = render(graph, name)
        model_hpp = render_model(graph, name)  # refuses, naming the node, what v1.1 has no layer for
        paths = [out_dir / f"{name}_coefficient.hpp", out_dir / f"{name}_coefficient.cpp", out_dir / f"{name}_model.hpp"]
        report = report_text(graph, name, [p.name for p in paths])
        paths.append(out_dir / f"{name}_coefficient_report.md")
        for path, text in zip(paths, (hpp, cpp, model_hpp, report)):
            write_file_atomic(path, text)
        for layer in graph.layers().values():
            if layer.bias_clipped:
                log.warning(
                    "%s: %d bias value(s) of %r saturated to %d bits", self.spec.chip, layer.bias_clipped,
                    layer.kernel.name, layer.bias_bits,
                )
        return paths

    def _export_espdl(self, result: QuantizationResult, out_dir: Path, name: str) -> list[Path]:
        """The ESP-DL v3 ``.espdl`` file, by the writer in ``espdl/``."""
        try:
            from ortq.plugins.backends.esp32.espdl import write_espdl
        except ImportError:
            raise ModelError(
                f"the ESP-DL v3 .espdl writer is not available in this version of ortq, so {self.spec.chip} "
                "cannot be exported as .espdl yet"
            ) from None
        path = out_dir / f"{name}.espdl"
        write_espdl(result.model, self.spec.chip, path)
        return [path]

    # -- host simulation ---------------------------------------------------------------------------------
    def evaluate(
        self,
        result: QuantizationResult | onnx.ModelProto,
        feeds: Mapping[str, np.ndarray],
        stats: EvaluationStats | None = None,
    ) -> dict[str, np.ndarray]:
        """Outputs (dequantized to float) of ``result``'s QDQ model run with this chip's integer arithmetic."""
        model = result if isinstance(result, onnx.ModelProto) else result.model
        if not isinstance(result, onnx.ModelProto):
            self.check_runnable(result)
        return evaluate_qdq(model, feeds, self.spec, stats)

    def evaluation_report(
        self,
        result: QuantizationResult,
        feeds: Mapping[str, np.ndarray],
        out_dir: Path,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """Run :meth:`evaluate` and write ``<name>_evaluation.md`` beside the C++ files: per output the SQNR and
        top-1 agreement against ``reference`` (default: ONNX Runtime running the QDQ model), and per layer
        the largest accumulator reached against the accumulator width."""
        stats = EvaluationStats()
        simulated = self.evaluate(result, feeds, stats)
        source = "given" if reference is not None else "ONNX Runtime running the QDQ model"
        if reference is None:
            import onnxruntime as ort

            session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            reference = dict(zip(names, session.run(names, dict(feeds))))
        name = self.coefficient_name(result)
        lines = [f"# ESP-DL host simulation of '{name}' on {self.spec.chip} (int{self.spec.bits})", ""]
        samples = next(iter(feeds.values())).shape[0] if feeds else 0
        lines.append(f"{samples} sample(s); reference: {source}")
        lines += ["", "| output | SQNR vs reference (dB) | max abs diff | top-1 agreement |", "|---|---|---|---|"]
        for out, sim in simulated.items():
            ref = np.asarray(reference[out], dtype=np.float64)
            err = sim.astype(np.float64) - ref
            noise = float(np.sum(err**2))
            sqnr = float("inf") if noise == 0 else 10 * np.log10(max(float(np.sum(ref**2)), 1e-30) / noise)
            top1 = float(np.mean(sim.argmax(-1) == ref.argmax(-1))) if sim.ndim >= 2 and sim.shape[-1] > 1 else float("nan")
            lines.append(f"| {out} | {sqnr:.1f} | {float(np.abs(err).max(initial=0)):.4g} | {top1:.2%} |")
        width = self.spec.accumulator_bits
        lines += ["", f"| layer | largest accumulator | bits needed (width {width}) |", "|---|---|---|"]
        for layer, value in stats.max_accumulator.items():
            need = value.bit_length() + 1
            lines.append(f"| {layer} | {value} | {need}{' OVER' if need > width else ''} |")
        saturated = {t: n for t, n in stats.saturated.items() if n}
        if saturated:
            lines += ["", "Saturated requantizations: " + ", ".join(f"{t}: {n}" for t, n in saturated.items())]
        path = Path(out_dir) / f"{name}_evaluation.md"
        write_file_atomic(path, "\n".join(lines) + "\n")
        return path


def _unsupported_shape(node: onnx.NodeProto, ctx: PlanContext) -> str | None:
    """Why ESP-DL cannot run this (supported-type) node, or None."""
    op = node.op_type
    attr = ctx.attribute
    if op == "Conv":
        w = ctx.index.constant_value(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            return "ESP-DL convolutions need a constant filter"
        if w.ndim != 4:
            return f"only 2-D convolutions run on ESP-DL (this one is {w.ndim - 2}-D)"
        group = int(attr(node, "group", 1))
        if group != 1 and not (w.shape[1] == 1 and w.shape[0] == group):
            return (
                f"grouped convolution (group={group}, {w.shape[1]} input channels per group) is not supported: "
                "ESP-DL has Conv2D and DepthwiseConv2D (one filter per channel) only"
            )
        return None
    if op == "Gemm":
        if not ctx.is_constant(node.input[1]):
            return "ESP-DL's FullyConnected needs a constant weight"
        if int(attr(node, "transA", 0)) or float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0:
            return "Gemm with transA, alpha or beta other than the defaults has no ESP-DL kernel"
        if len(node.input) > 2 and node.input[2]:
            c = ctx.index.shape(node.input[2])
            if c is not None and len(c) != 1:
                return "the Gemm bias must be a vector (one value per output)"
        return None
    if op == "MatMul":
        b = ctx.index.constant_value(node.input[1])
        if b is None or b.ndim != 2:
            return "ESP-DL's FullyConnected needs a constant 2-D weight"
        a = ctx.index.shape(node.input[0])
        if a is not None and len(a) != 2:
            return f"ESP-DL's FullyConnected takes a 2-D input (this one is {len(a)}-D)"
        return None
    if op in ("MaxPool", "AveragePool"):
        kernel = attr(node, "kernel_shape") or []
        if len(kernel) != 2:
            return "ESP-DL pools 2-D feature maps only"
        if int(attr(node, "ceil_mode", 0)):
            return "ceil_mode=1 is not supported"
        if any(d != 1 for d in (attr(node, "dilations") or [])):
            return "dilated pooling is not supported"
        if len([o for o in node.output if o]) > 1:
            return "MaxPool's indices output is not supported"
        if op == "AveragePool":
            pads = attr(node, "pads") or []
            auto = attr(node, "auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            if any(pads) or auto not in ("NOTSET", "VALID"):
                return "padded average pooling is not supported"
        return None
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        shape = ctx.index.shape(node.input[0])
        if shape is not None and len(shape) != 4:
            return "ESP-DL pools 2-D feature maps only"
        return None
    if op in ("Add", "Mul"):
        producer = ctx.index.producer.get(node.input[0])
        other = ctx.index.producer.get(node.input[1]) if len(node.input) > 1 else None
        matmul_bias = op == "Add" and any(
            p is not None and p.op_type == "MatMul" for p in (producer, other)
        ) and any(ctx.is_constant(t) for t in node.input)
        if matmul_bias:
            return None
        if any(ctx.is_constant(t) for t in node.input):
            return f"ESP-DL's {op}2D takes two feature maps, not a constant"
        a, b = ctx.index.shape(node.input[0]), ctx.index.shape(node.input[1])
        if a is not None and b is not None and a != b:
            return f"ESP-DL's {op}2D needs equal shapes ({a} vs {b})"
        return None
    if op == "Clip":
        for i in (1, 2):
            if len(node.input) > i and node.input[i] and not ctx.is_constant(node.input[i]):
                return "Clip bounds must be constants"
        return None
    if op == "Reshape":
        if not ctx.is_constant(node.input[1]):
            return "the target shape must be a constant"
        return None
    return None


def _chip_target(chip: str) -> type[Esp32Backend]:
    """``--target esp32s3`` / ``ortq export esp32s3``: the esp32 target with its chip preset."""

    def __init__(self: Esp32Backend, bits: int | str = 8, model_name: str | None = None, format: str | None = None) -> None:
        Esp32Backend.__init__(self, chip=chip, bits=bits, model_name=model_name, format=format)

    return type(
        f"{chip.capitalize()}Backend", (Esp32Backend,),
        {"name": chip, "output_formats": tuple(f for f, v in FORMATS.items() if chip in (V1_CHIPS if v == "1.1" else V3_CHIPS)),
         "description": (
            f"Espressif ESP-DL on {chip}: "
            + ("v1.1 C++ coefficients and model class" if chip in V1_CHIPS else "")
            + (" or " if chip in V1_CHIPS and chip in V3_CHIPS else "")
            + ("v3 .espdl" if chip in V3_CHIPS else "")
        ),
         "__init__": __init__, "__doc__": f"The esp32 target for the {chip} chip."},
    )


@hookimpl
def ortq_register_backends(register):
    register(Esp32Backend)
    for chip in _CHIPS:
        if chip != Esp32Backend.name:
            register(_chip_target(chip))
