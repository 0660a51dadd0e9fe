"""Which expert Linears receive the same input tensor in calibration mode, read from the synthesized graph.

A statistic a calibration method keeps per Linear from its inputs alone (GPTQ's Hessian ``XᵀX``, a static
input observer's min/max, AWQ's and SmoothQuant's activation scales) is then the same for every Linear of
a group, and can be computed once for it.

Two facts decide it, both read from what autocal synthesized, never from module names:

- the container's calibration path: a container of unpacked experts (``CalibrationExperts``) that applies
  the routing weight last runs, in calibration mode, every expert on all of its block's token rows and
  passes each expert the same tensor (``CalibrationExperts._dense``). With ``calibration_chunk_size`` set,
  or a routing weight applied inside the expert, each expert gets its own rows, and experts share nothing;
- the expert template's graph: which node each Linear's input comes from. Linears fed by the template's
  input placeholder share across every expert of the container; Linears fed by another node of the
  template (both halves of a projection, after a norm, say) share within one expert.
"""

from __future__ import annotations

from torch import fx, nn

from .detect.structure import ExpertTemplate
from .registry import MoECalibrationModule
from .synthesize.experts import CalibrationExperts

__all__ = ["expert_linear_sets", "linear_inputs", "shared_input_groups"]

_INPUT = "x"  # the template's placeholder for an expert's input rows (``ExpertTemplate``)


def linear_inputs(graph: fx.Graph, linears: set[str]) -> dict[str, fx.Node]:
    """For each Linear of an expert template, the node its input comes from.

    A Linear is used as a module (``call_module``) or handed, as a ``get_attr`` node, to a function whose
    first argument is its input (``ops.project(x, (gate_proj, up_proj), …)``).
    """
    inputs: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in linears:
            inputs[node.target] = node.args[0]
        elif node.op == "call_function" and node.args:
            source = node.args[0]
            for used in node.all_input_nodes:
                if used is not source and used.op == "get_attr" and used.target in linears:
                    inputs[used.target] = source
    return inputs


def _shares_rows(container: CalibrationExperts) -> bool:
    """Does the container, in calibration mode, pass every expert the same rows (see the module docstring)?"""
    return bool(container.dense_calibration) and container.calibration_chunk_size is None


def _container_groups(path: str, container: CalibrationExperts, template: ExpertTemplate) -> list[list[str]]:
    names = [recipe.name for recipe in template.linears]
    inputs = linear_inputs(template.graph, set(names))
    across = _shares_rows(container)
    groups: dict[tuple, list[str]] = {}
    for expert in range(len(container)):
        for name in names:
            source = inputs.get(name)
            if source is None:
                continue
            shared = across and source.op == "placeholder" and source.target == _INPUT
            key = (source.name,) if shared else (expert, source.name)
            groups.setdefault(key, []).append(f"{path}.{expert}.{name}" if path else f"{expert}.{name}")
    return [members for members in groups.values() if len(members) > 1]


def _containers(model: nn.Module):
    """``(path, container, template)`` for each experts container autocal unpacked (``CalibrationExperts``)."""
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, MoECalibrationModule)]
    for block_path, block in blocks:
        structure = getattr(block, "structure", None)
        if structure is None:
            continue
        container = block.get_submodule(structure.experts.module_path)
        if isinstance(container, CalibrationExperts):
            yield ".".join(p for p in (block_path, structure.experts.module_path) if p), container, structure.template


def expert_linear_sets(model: nn.Module) -> list[list[str]]:
    """For each container of experts autocal unpacked and each Linear of its expert template, that Linear in
    every expert, in expert order (module paths): the Linears the grouped calibration forward computes
    together, a projection across a run of consecutive experts (``synthesize/grouped.py``)."""
    sets = []
    for path, container, template in _containers(model):
        prefix = f"{path}." if path else ""
        sets += [[f"{prefix}{expert}.{recipe.name}" for expert in range(len(container))] for recipe in template.linears]
    return sets


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Groups of expert Linears (module paths) that receive the same input tensor in calibration mode.

    Every Linear of a group is called on the very same tensor in every calibration forward. Linears that
    share with no other are left out. Blocks converted by a hand-written override carry no detected
    structure and contribute nothing, as do blocks whose experts are not a container autocal unpacked.
    """
    groups: list[list[str]] = []
    for path, container, template in _containers(model):
        groups += _container_groups(path, container, template)
    return groups
