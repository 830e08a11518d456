"""ortq plugin: quantize DepthToSpace and SpaceToDepth (pixel shuffle / unshuffle) on 8-bit data.

Super-resolution models end in ``Conv -> DepthToSpace``; without this plugin ortq leaves the shuffle
in float, so the int8 chain is broken by a DequantizeLinear/QuantizeLinear pair around it.
"""

from __future__ import annotations

import onnx

from ortq import LeaveFloat, NodePlan, OpQuantizer, PlanContext, SameAs, hookimpl

__version__ = "0.1.0"
__all__ = ["PixelShuffleQuantizer", "ortq_register_op_quantizers"]


class PixelShuffleQuantizer(OpQuantizer):
    """Plans the output with the input's exact scale and zero point (:class:`ortq.SameAs`).

    Both ops (in DCR and CRD mode alike) only permute elements between the channel and spatial axes:
    every output value is some input value, unchanged. The output's range is therefore the input's,
    and reusing its parameters is exact, whereas calibrating a fresh range could only add rounding.
    Matching parameters are also what lets ONNX Runtime drop the DQ -> op -> Q around a data-movement
    op. The planner admits a SameAs output only when the input is already quantized, so a shuffle fed
    by float ops stays float instead of gaining a Q/DQ pair with no integer kernel on either side.
    """

    op_types = ("DepthToSpace", "SpaceToDepth")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(outputs={0: SameAs(0)})


@hookimpl
def ortq_register_op_quantizers(register) -> None:  # noqa: ANN001 - the hookspec documents it
    register(PixelShuffleQuantizer)
