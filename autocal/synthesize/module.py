"""The synthesized calibration module for one block (experts-level rewrite).

The block keeps its own forward, router, shared experts and every other
submodule (the same objects, not copies); only the packed experts container is
swapped for a ``CalibrationExperts``. Routing is therefore exact by
construction. Parameter names stay those of the original block, with the
experts as ``experts.{i}.gate_proj.weight`` and so on.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

from torch import nn

from ..detect.linear_like import as_linear
from ..detect.plans import PackedExpertsPlan, Plan
from ..detect.structure import MoEStructure
from ..registry import MoECalibrationModule
from ..trace.forcing import fresh_inputs
from ..trace.inputs import keyword_arguments
from .experts import CalibrationExperts
from .unpack import expert_class, view_entries

__all__ = ["AdoptedMoE", "KeptForwardMoE", "SynthesizedMoE", "adopt", "build_calibration_module",
           "checked_chunk_size", "forward_declaring", "kept_forward_class", "owned"]

# nn.Module's own bookkeeping: fresh for the new module, never shared with the original.
_MODULE_INTERNALS = ("hooks", "_parameters", "_buffers", "_modules", "_hooks_with_kwargs", "_always_called",
                     "_is_full_backward_hook", "_non_persistent_buffers_set")


def forward_declaring(forward: Callable, original_forward: Callable) -> Callable:
    """``forward`` (taking ``*args, **kwargs``), declaring ``original_forward``'s parameters to ``inspect.signature``.

    Generated modules bind their arguments to the original's parameters themselves,
    but a tool may replay a module's call by parameter name: LLM Compressor's AWQ
    caches a parent module's inputs with ``inspect.signature(module.forward).bind``
    and calls it again with them as keywords. ``*args, **kwargs`` names nothing.
    """
    def declared(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    declared.__signature__ = inspect.signature(original_forward)  # with ``self``: a bound method drops it
    declared.__name__, declared.__qualname__, declared.__doc__ = "forward", "forward", forward.__doc__
    return declared


def checked_chunk_size(tokens: Any) -> int | None:
    """``tokens`` if it can be ``calibration_chunk_size`` (a positive int, or None), else ``ValueError``."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"calibration_chunk_size must be a positive int or None, got {tokens!r}")
    return tokens


def adopt(module: nn.Module, original: nn.Module) -> None:
    """Make ``module`` hold the original's attributes, parameters, buffers and children (the same objects)."""
    nn.Module.__init__(module)
    for key, item in original.__dict__.items():
        if not key.endswith(_MODULE_INTERNALS):
            module.__dict__[key] = item
    module._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    module._parameters.update(original._parameters)
    module._buffers.update(original._buffers)
    module._modules.update(original._modules)
    module.__dict__["_original"] = original


def owned(module: nn.Module, original: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``module``, made its own copy of the original's, as is each one on the way.

    For changing a child deeper than the block's own children without touching the original.
    """
    for part in path.split(".") if path else ():
        child, original = module._modules[part], original._modules[part]
        if child is original:
            child = type(original).__new__(type(original))
            adopt(child, original)
            module._modules[part] = child
        module = child
    return module


class AdoptedMoE(MoECalibrationModule):
    """A calibration module holding the original block's members (the same objects).

    Generated classes are ``Calibration<Block>(<one of the subclasses>, <Block>)``:
    inheriting from the original block class keeps its forward and helper
    methods, and keeps ``isinstance`` checks in model code true. Subclasses say
    what replaces the experts (``_experts_for``) and whether that is permanent.
    """

    plan: Plan
    structure: MoEStructure  # the plan's, what ``explain`` and tools read

    def __init__(self, original: nn.Module, config: Any = None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        name = self.structure.experts.module_path
        replacement = self._experts_for(original.get_submodule(name), calibrate_all_experts)
        if replacement is not None:
            parent, _, leaf = name.rpartition(".")
            owned(self, original, parent)._modules[leaf] = replacement
        for path in self.structure.experts.linear_views:  # the experts' own Linear class, seen as nn.Linear
            parent, _, leaf = path.rpartition(".")
            holder = owned(self, original, parent)
            holder._modules[leaf] = as_linear(holder._modules[leaf])
        if self.structure.experts.template is not None:  # experts with no Linear: each cut into Linear views
            view_entries(owned(self, original, name), self.structure.experts.template,
                         f"{type(original).__name__}Expert")
        self.calibrate_all_experts = calibrate_all_experts

    def _experts_for(self, experts: nn.Module, calibrate_all_experts: bool) -> nn.Module | None:
        """The module that replaces the experts container (None: keep it)."""
        return None

    @property
    def experts_container(self) -> nn.Module:
        return self.get_submodule(self.structure.experts.module_path)

    @property
    def calibrate_all_experts(self) -> bool:
        return self.__dict__.get("_calibrate_all_experts", True)

    @calibrate_all_experts.setter
    def calibrate_all_experts(self, enabled: bool) -> None:
        self.__dict__["_calibrate_all_experts"] = bool(enabled)
        if hasattr(self.experts_container, "calibrate_all_experts"):
            self.experts_container.calibrate_all_experts = bool(enabled)

    def restore(self, original: nn.Module | None = None) -> nn.Module:
        """The original block (whose packed parameters share storage with any unpacked experts)."""
        return original if original is not None else self.__dict__["_original"]

    def expert_modules(self) -> list[nn.Module]:
        container = self.experts_container
        if callable(getattr(type(container), "experts", None)):  # autocal's containers (a user's may hold "experts")
            return container.experts()
        return [m for m in container.children() if next(m.parameters(), None) is not None]  # not zero/identity

    @property
    def code(self) -> str:
        """The generated code: the block's new forward where there is one, and one expert's forward."""
        parts = [type(self).__dict__.get("generated_code", "")]
        code = getattr(type(self.experts_container), "code", None)  # autocal's, never a user's entry named "code"
        parts.append(code.__get__(self.experts_container) if isinstance(code, property) else "")
        return "\n# one expert:\n".join(p for p in parts if p)


class KeptForwardMoE(AdoptedMoE):
    """The block's own forward, unchanged (output the original's, routed rows seen through it).

    With calibration on, the forward runs inside ``watching()`` (a context that
    notes what the experts were given), then ``run_unrouted(bound, seen)`` runs
    each expert on the tokens the forward did not give it, from the same inputs
    by name; those outputs are discarded. Nothing is unpacked for good.
    """

    is_permanent = False

    def forward(self, *args, **kwargs):
        if not self.calibrate_all_experts:
            return self._block_forward(*args, **kwargs)
        given = fresh_inputs((args, kwargs))  # the forward may change its inputs in place (``x *= k``)
        with self.watching() as seen:
            output = self._block_forward(*args, **kwargs)
        self.run_unrouted(keyword_arguments(self._signature, *given), seen)
        return output

    def watching(self) -> ContextManager:
        return nullcontext()

    def run_unrouted(self, bound: dict, seen: Any) -> None:
        raise NotImplementedError


def kept_forward_class(base: type[KeptForwardMoE], plan: Plan, block: nn.Module) -> type[KeptForwardMoE]:
    """``Calibration<Block>(base, <Block>)``, keeping the block's forward to call first."""
    return type(
        f"Calibration{type(block).__name__}",
        (base, type(block)),
        {"plan": plan, "structure": plan.structure, "_block_forward": type(block).forward,
         "_signature": inspect.signature(type(block).forward.__get__(block)), "__module__": base.__module__,
         "forward": forward_declaring(base.forward, type(block).forward)},
    )


class SynthesizedMoE(AdoptedMoE):
    """Experts-level rewrite: the packed container becomes per-expert Linear modules; all else is the original."""

    is_permanent = True

    def _experts_for(self, experts: nn.Module, calibrate_all_experts: bool) -> nn.Module:
        return self._experts_cls(experts, self.structure, self._expert_cls, calibrate_all_experts)

    @property
    def calibration_chunk_size(self) -> int | None:
        """At most this many unrouted tokens per expert call in calibration mode (``set_calibration_chunk_size``)."""
        return self.experts_container.calibration_chunk_size

    @calibration_chunk_size.setter
    def calibration_chunk_size(self, tokens: int | None) -> None:
        self.experts_container.calibration_chunk_size = checked_chunk_size(tokens)


def build_calibration_module(plan: PackedExpertsPlan, block: nn.Module) -> type[SynthesizedMoE]:
    """The calibration class for one block class, generated once and reused for all its blocks."""
    structure = plan.structure
    block_cls = type(block)
    container = block.get_submodule(structure.experts.module_path)
    expert_cls = expert_class(structure.template, f"{block_cls.__name__}Expert", container)
    experts_cls = type(f"Calibration{type(container).__name__}", (CalibrationExperts,),
                       {"forward": forward_declaring(CalibrationExperts.forward, type(container).forward),
                        "__module__": CalibrationExperts.__module__})
    return type(
        f"Calibration{block_cls.__name__}",
        (SynthesizedMoE, block_cls),
        {"plan": plan, "structure": structure, "_expert_cls": expert_cls, "_experts_cls": experts_cls,
         "__module__": __name__},
    )
