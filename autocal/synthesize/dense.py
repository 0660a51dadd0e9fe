"""Calibration for packed experts run densely on every token, with routing applied to their inputs.

``DenseCalibrationExperts`` replaces the batched container. With calibration
off it runs the original container while the unpacked Linears are untouched
(bitwise the original), and the Linears otherwise. With calibration on, for
each expert, the tokens it was routed run through it scaled, as in the
original; the tokens it was not routed run through it *unscaled* and are
discarded; and their rows of the output are what the original computes for
them, the expert applied to zeros, computed on the packed storage without
being observed.
"""

from __future__ import annotations


import torch
from torch import fx, nn

from ..detect.plans import DenseExpertsPlan
from ..detect.structure import MoEStructure
from .block import BlockRewriteMoE, _codegen_root
from .unpack import SynthesizedExpert, UnpackedExperts, expert_class
from ..numerics import unobserved, untouched

__all__ = ["DenseCalibrationExperts", "build_dense_rewrite"]


class DenseCalibrationExperts(UnpackedExperts):
    """Per-expert modules ``"0"``, ``"1"``, … for a container that runs every expert on every token."""

    def __init__(self, original: nn.Module, structure: MoEStructure, expert_cls: type[SynthesizedExpert],
                 calibrate_all_experts: bool = True) -> None:
        super().__init__(original, structure, expert_cls, calibrate_all_experts)
        self.projections = [p.linears for p in structure.template.projections]
        self.__dict__["_original"] = original

    def _untouched(self) -> bool:
        return all(
            untouched(tuple(module._modules[n] for n in names), getattr(module, f"_autocal_layout_{i}"))
            for module in self.experts()
            for i, names in enumerate(self.projections)
        )

    def forward(self, hidden_states: torch.Tensor, unscaled: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_states.shape[0] == 0 or (not self.calibrate_all_experts and self._untouched()):
            return self.__dict__["_original"](hidden_states)
        rows = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        calibrating = self.calibrate_all_experts and unscaled is not None and scale is not None
        outputs = []
        for expert in range(self.num_experts):
            module = self._modules[str(expert)]
            if calibrating:
                routed = scale.reshape(self.num_experts, -1)[expert] != 0
                unscaled_rows = unscaled.view(self.num_experts, -1, unscaled.shape[-1])[expert]
                outputs.append(self._calibrate(module, rows[expert], unscaled_rows, routed))
            else:
                outputs.append(module(rows[expert]))
        return torch.stack(outputs).view(-1, outputs[0].shape[-1])

    @staticmethod
    def _calibrate(module: nn.Module, scaled: torch.Tensor, unscaled: torch.Tensor,
                   routed: torch.Tensor) -> torch.Tensor:
        routed_rows = routed.nonzero().squeeze(-1)
        unrouted_rows = (~routed).nonzero().squeeze(-1)
        output = None
        if routed_rows.numel():
            routed_out = module(scaled[routed_rows])
            output = routed_out.new_empty(scaled.shape[0], routed_out.shape[-1])
            output[routed_rows] = routed_out
        if unrouted_rows.numel():
            module(unscaled[unrouted_rows])  # seen by calibration, discarded
            with unobserved(), torch.no_grad():
                zero_out = type(module).forward(module, scaled[unrouted_rows[:1]])
            if output is None:
                output = zero_out.new_empty(scaled.shape[0], zero_out.shape[-1])
            output[unrouted_rows] = zero_out
        return output



class DenseRewriteMoE(BlockRewriteMoE):
    """Block-level rewrite whose packed, dense experts container is unpacked (so: permanent)."""

    is_permanent = True

    def _experts_for(self, experts: nn.Module, calibrate_all_experts: bool) -> nn.Module:
        return DenseCalibrationExperts(experts, self.structure, self._expert_cls, calibrate_all_experts)


def build_dense_rewrite(plan: DenseExpertsPlan, block: nn.Module) -> type[DenseRewriteMoE]:
    structure = plan.structure
    graph = fx.Graph()
    graph.output(graph.graph_copy(plan.rewrite.graph, {}))
    graph.lint()
    block_cls = type(block)
    generated = fx.GraphModule(_codegen_root(block, graph), graph, class_name=f"Calibration{block_cls.__name__}")
    container = block.get_submodule(structure.experts.module_path)
    expert_cls = expert_class(structure.template, f"{block_cls.__name__}Expert", container)
    return type(
        f"Calibration{block_cls.__name__}",
        (DenseRewriteMoE, block_cls),
        {"forward": type(generated).forward, "plan": plan, "structure": structure, "_expert_cls": expert_cls,
         "generated_code": generated.code, "__module__": __name__},
    )
