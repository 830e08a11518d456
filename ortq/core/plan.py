"""The quantization plan: which tensor gets which scheme, which nodes stay float and why.

The planner (:mod:`ortq.pipeline.plan`) makes it; every later stage, the tools and the backends read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ortq.core.op_quantizer import Activation, Role
from ortq.core.scheme import QuantSpec

__all__ = ["TensorPlan", "FloatNode", "QuantPlan"]


@dataclass
class TensorPlan:
    """The decision for one tensor; ``spec`` is None for int32 biases and for :class:`SameAs` outputs."""

    name: str
    role: Role
    spec: QuantSpec | None
    constant: bool
    node: str  # the node whose plan introduced it (for messages)
    source: str | None = None  # SameAs: the tensor whose parameters this one copies
    bias_input: str | None = None
    bias_weight: str | None = None


@dataclass
class FloatNode:
    name: str
    op_type: str
    reason: str


@dataclass
class QuantPlan:
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    quantized_nodes: dict[str, str] = field(default_factory=dict)  # node name -> op type
    float_nodes: list[FloatNode] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)  # tensor -> activation node folded into it
    pruned: dict[str, str] = field(default_factory=dict)  # tensor -> why its Q/DQ was dropped

    def observed_tensors(self) -> list[str]:
        """Activations whose range must come from calibration, in graph order."""
        return [
            t.name
            for t in self.tensors.values()
            if isinstance(t.role, Activation) and t.role.fixed_range is None and not t.constant
        ]
