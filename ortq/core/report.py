"""What one quantization run reports: how far each output drifted, and everything the run decided.

Plain data shared by the pipeline that fills it, the backends that export from it and the callers that
read it; no stage logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ortq.core.config import QuantConfig
from ortq.core.plan import QuantPlan
from ortq.core.scheme import QuantParams

__all__ = ["OutputComparison", "VerificationReport", "QuantizationResult", "size_change"]


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


@dataclass
class QuantizationResult:
    """Everything a caller may want to know about one quantization run."""

    model: onnx.ModelProto
    output: Path | None
    target: str
    config: QuantConfig
    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    params: dict[str, QuantParams]
    vetoes: dict[str, str]
    calibration_batches: int
    calibration_samples: int
    verification: VerificationReport
    float_bytes: int
    quantized_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    #: Dynamic quantization (:func:`quantize_dynamic`): no ranges, no calibration.
    dynamic: bool = False
    #: What the SQNR-floor fallback of ``Toolkit.quantize`` kept in higher precision, one line each (empty
    #: when the first model met the floor).
    fallback: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for humans (the CLI prints this)."""
        lines = [
            f"quantized {len(self.plan.quantized_nodes)} node(s), left {len(self.plan.float_nodes)} in float "
            + (
                f"(target {self.target}, calibrator {self.config.calibrator}, "
                f"{self.calibration_samples} sample(s) in {self.calibration_batches} batch(es))"
                if not self.dynamic else f"(target {self.target}, dynamic: activations quantized at run time)"
            ),
            f"size: {self.float_bytes / 1e6:.3f} MB -> {self.quantized_bytes / 1e6:.3f} MB "
            f"({size_change(self.float_bytes, self.quantized_bytes)})",
        ]
        for o in self.verification.outputs:
            top1 = f", top-1 agreement {o.top1_agreement:.2%}" if o.top1_agreement is not None else ""
            lines.append(
                f"output {o.name!r}: SQNR {o.sqnr_db:.1f} dB, max abs error {o.max_abs_error:.4g}{top1} "
                f"({self.verification.samples} sample(s))"
            )
        for tensor, reason in self.vetoes.items():
            lines.append(f"kept float around {tensor!r}: {reason}")
        lines.extend(self.fallback)
        return "\n".join(lines)


def size_change(before: int, after: int) -> str:
    """"3.62x smaller" or "1.79x larger": a tiny model gains Q/DQ nodes and grows, and must not read as shrinking."""
    if after < before:
        return f"{before / max(after, 1):.2f}x smaller"
    if after > before:
        return f"{after / max(before, 1):.2f}x larger"
    return "same size"
