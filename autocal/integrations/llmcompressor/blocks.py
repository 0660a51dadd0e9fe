"""What autocal converted: its calibration blocks, their expert Linears and the gates it detected."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...registry import MoECalibrationModule

__all__ = [
    "ExpertLinear",
    "calibration_blocks",
    "default_ignore",
    "expert_linears",
    "gate_modules",
]


def _listing(what: str, problems: list[str]) -> str:
    shown = "\n  - ".join(problems[:20])
    more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{len(problems)} {what} problem(s):\n  - {shown}{more}"


@dataclass(frozen=True)
class ExpertLinear:
    """One ``nn.Linear`` of one expert: ``{block}.{container}.{key}.{name}`` (``key``: the expert's name in its
    container, ``str(expert)`` in a list; ``name`` empty where the Linear is the expert)."""

    path: str
    block: str
    container: str
    expert: int
    name: str
    key: str = ""

    @property
    def child(self) -> str:
        """The expert's name in its container."""
        return self.key or str(self.expert)


def calibration_blocks(model: nn.Module) -> list[tuple[str, MoECalibrationModule]]:
    """Every calibration module in ``model`` (outermost only), with its path."""
    found: list[tuple[str, MoECalibrationModule]] = []
    for path, module in model.named_modules():
        if isinstance(module, MoECalibrationModule) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def expert_linears(model: nn.Module) -> list[ExpertLinear]:
    """Every ``nn.Linear`` inside every expert of every calibration module.

    Experts come from ``module.expert_modules()``, or, where one expert's Linears sit in several modules (one
    per gathered weight), ``module.expert_parts()``; their path is found by identity in the block, so
    hand-written overrides work too.
    """
    result: list[ExpertLinear] = []
    for block_path, block in calibration_blocks(model):
        if hasattr(block, "expert_parts"):
            parts = block.expert_parts()
        elif hasattr(block, "expert_modules"):
            parts = [[expert] for expert in block.expert_modules()]
        else:
            continue
        names = {id(m): n for n, m in block.named_modules()}
        for index, modules in enumerate(parts):
            for expert in modules:
                expert_path = names.get(id(expert))
                if expert_path is None:
                    continue
                container, _, key = expert_path.rpartition(".")
                for name, sub in expert.named_modules():
                    if isinstance(sub, nn.Linear):
                        result.append(ExpertLinear(_join(block_path, expert_path, name), block_path, container, index,
                                                   name, key))
    return result


def gate_modules(model: nn.Module) -> list[str]:
    """Module paths of the gates autocal detected: each block's router (and Linears inside it), and bare
    ``nn.Linear`` shared modules of a block with a gate's outputs (at most one per expert: a shared expert's
    scalar gate, as in Qwen2-MoE; not a projection every expert shares).

    The router is the outermost child of the block that holds the module computing the logits and nothing of the
    experts or the shared modules: all of an MLP router (``router = Sequential(Linear, GELU, Linear)``), not only
    its last Linear. Read from each calibration module's detected structure, never from a list of names. Blocks
    converted by a hand-written override carry no structure and contribute nothing.
    """
    gates: list[str] = []
    for block_path, block in calibration_blocks(model):
        structure = getattr(block, "structure", None)
        if structure is None:
            continue
        router_path = _router_holder(structure)
        if router_path:
            router = block.get_submodule(router_path)
            gates.append(_join(block_path, router_path))
            gates += [_join(block_path, router_path, n) for n, m in router.named_modules()
                      if n and isinstance(m, nn.Linear)]
        for shared in structure.shared_modules:
            module = block.get_submodule(shared)
            if isinstance(module, nn.Linear) and not list(module.children()) and (
                    module.out_features <= structure.experts.num_experts):
                gates.append(_join(block_path, shared))
    return list(dict.fromkeys(gates))


def _router_holder(structure) -> str | None:
    """The outermost prefix of the router's path that holds neither the experts nor a shared module."""
    path = structure.router.module_path
    if not path:
        return path
    others = [structure.experts.module_path, *structure.shared_modules]
    parts = path.split(".")
    for length in range(1, len(parts) + 1):
        prefix = ".".join(parts[:length])
        if not any(other == prefix or other.startswith(f"{prefix}.") for other in others if other):
            return prefix
    return path


def _output_embedding_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def default_ignore(model: nn.Module, *, lm_head: bool = True) -> list[str]:
    """The ``ignore`` list for a quantization modifier: the detected gates, and the output head."""
    ignore = gate_modules(model)
    head = _output_embedding_path(model) if lm_head else None
    if head:
        ignore.append(head)
    return list(dict.fromkeys(ignore))
