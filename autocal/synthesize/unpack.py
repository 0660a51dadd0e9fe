"""Experts unpacked from a packed container: one module per expert of real ``nn.Linear`` layers.

Each Linear's weight (and bias) is a view of the packed parameters, so no memory
is doubled; each expert's forward is the code fx generates from the detected
template, one class per analysed block class, shared by all its experts.
``UnpackedExperts`` holds them as children ``"0"``, ``"1"``, … (checkpoint keys
``experts.{i}.…``) with everything else the original container held.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..detect.block import identical_entries
from ..detect.entry_template import EntryWeights
from ..detect.experts import CONTAINER_ATTR
from ..detect.tail import EXPERT_ATTR
from ..detect.structure import ExpertTemplate, LinearRecipe, MoEStructure, Projection
from ..numerics import ProjectionLayout, geometry

__all__ = ["SynthesizedExpert", "UnpackedExperts", "expert_class", "unpack_linear", "linear_of", "projection_layout",
           "build_experts", "view_entries"]


class SynthesizedExpert(nn.Module):
    """Base of the generated per-expert classes; ``forward`` comes from the template."""

    template_code: str = ""


def expert_class(template: ExpertTemplate, name: str, container: nn.Module) -> type[SynthesizedExpert]:
    """A module class whose forward is the template's generated code."""
    root = nn.Module()
    root.__dict__[CONTAINER_ATTR] = container
    root.__dict__[EXPERT_ATTR] = 0  # each expert's own number (see build_experts)
    for recipe in template.linears:
        setattr(root, recipe.name, nn.Linear(1, 1, device="meta"))
    for index in range(len(template.projections)):
        setattr(root, f"_autocal_layout_{index}", None)
    generated = fx.GraphModule(root, template.graph, class_name=name)
    return type(name, (SynthesizedExpert,), {"forward": type(generated).forward, "template_code": generated.code})


def unpack_linear(recipe: LinearRecipe, container: nn.Module, expert: int) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) view expert ``expert``'s packed entries."""
    return linear_of(recipe.weight(container, expert),
                     recipe.bias(container, expert) if recipe.bias is not None else None)


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None = None, requires_grad: bool | None = None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are ``weight`` ``[out, in]`` and ``bias`` themselves (views, no copy),
    needing gradients as they do, or as ``requires_grad`` says.

    Made as ``nn.Linear.__init__`` makes one, less the random initialization of a weight that is replaced at
    once: a block has 3E of these (768 at DeepSeek-V3's shape), and the initialization, even on the meta
    device, made them about ten times as slow to build (``tests/test_api.py`` checks that nothing else
    differs)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    grad = lambda t: t.requires_grad if requires_grad is None else requires_grad  # noqa: E731
    linear.register_parameter("weight", nn.Parameter(weight.detach(), requires_grad=grad(weight)))
    linear.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=grad(bias)))
    return linear


def projection_layout(projection: Projection, expert_module: nn.Module, container: nn.Module,
                      expert: int) -> ProjectionLayout | None:
    """Where expert ``expert``'s original operand lies relative to its unpacked Linears, or None."""
    linears = [expert_module._modules[name] for name in projection.linears]
    operand = projection.operand(container, expert)
    bias = projection.bias(container, expert) if projection.bias is not None else None
    if operand.untyped_storage().data_ptr() != linears[0].weight.untyped_storage().data_ptr():
        return None
    return ProjectionLayout(
        op=projection.op,
        operand=geometry(operand),
        bias=geometry(bias) if bias is not None else None,
        bias_in_op=projection.bias_in_op,
        weights=tuple(geometry(linear.weight) for linear in linears),
        addresses=tuple((linear.weight.data_ptr(), linear.bias.data_ptr() if linear.bias is not None else None)
                        for linear in linears),
    )


class UnpackedExperts(nn.Module):
    """A container of unpacked experts, children ``"0"``, ``"1"``, … (checkpoint keys ``experts.{i}.…``).

    Everything else the original container holds (a shared norm, the
    activation module, buffers) moves here under the same name, so nothing is
    lost from the state dict and generated expert code finds it.
    """

    def __init__(self, original: nn.Module, structure: MoEStructure, expert_cls: type[SynthesizedExpert],
                 calibrate_all_experts: bool) -> None:
        super().__init__()
        self.num_experts = structure.experts.num_experts
        self._expert_names = [str(e) for e in range(self.num_experts)]
        self.calibrate_all_experts = calibrate_all_experts
        build_experts(self, original, structure.template, self.num_experts, expert_cls,
                      set(structure.experts.layout["packed_params"]))

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, expert: int) -> nn.Module:
        return self._modules[str(expert)]

    def experts(self) -> list[nn.Module]:
        modules = self._modules
        return [modules[name] for name in self._expert_names]

    @property
    def code(self) -> str:
        """The generated per-expert forward."""
        return type(self._modules["0"]).template_code


def build_experts(target: nn.Module, original: nn.Module, template: ExpertTemplate, num_experts: int,
                  expert_cls: type[SynthesizedExpert], packed: set[str]) -> None:
    """Fill ``target`` with one module per expert unpacked from ``original``, and the original's other members.

    ``packed`` names the parameters the experts are unpacked from; a child that
    holds some of them (DBRX keeps them one level down) is not kept, the rest is,
    and so is a packed parameter the template reads whole (a per-expert norm scale).
    """
    read = {n.target.partition(".")[2] for n in template.graph.nodes
            if n.op == "get_attr" and n.target.startswith(CONTAINER_ATTR + ".")}
    for name, param in original.named_parameters(recurse=False):
        if name not in packed or name in read:
            target.register_parameter(name, param)
    for name, buffer in original.named_buffers(recurse=False):
        target.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
    for name, child in original.named_children():
        if not any(p.startswith(name + ".") for p in packed):
            target.add_module(name, child)
    for expert in range(num_experts):
        module = expert_cls()
        module.__dict__[CONTAINER_ATTR] = target
        module.__dict__[EXPERT_ATTR] = expert
        for recipe in template.linears:
            module.add_module(recipe.name, unpack_linear(recipe, original, expert))
        for index, projection in enumerate(template.projections):
            setattr(module, f"_autocal_layout_{index}", projection_layout(projection, module, original, expert))
        target.add_module(str(expert), module)




def view_entries(container: nn.Module, template: ExpertTemplate, name: str) -> None:
    """Replace ``container``'s experts by modules of ``nn.Linear`` views of their own weights (``template``'s).

    For experts with no Linear to observe (raw parameter matmuls, kernel-1
    convolutions, ``detect/entry_template.py``); ``container`` is the block's own
    copy of the list, so the original keeps its experts.
    """
    entries = identical_entries(container)
    names = {id(m): n for n, m in container.named_children()}
    store = EntryWeights(entries)
    expert_cls = expert_class(template, name, entries[0])
    for expert, entry in enumerate(entries):
        module = expert_cls()
        module.__dict__[CONTAINER_ATTR] = entry
        for recipe in template.linears:
            module.add_module(recipe.name, unpack_linear(recipe, store, expert))
        for index, projection in enumerate(template.projections):
            setattr(module, f"_autocal_layout_{index}", projection_layout(projection, module, store, expert))
        container._modules[names[id(entry)]] = module
