"""Calibration for a list of expert modules that dispatches tokens in its own forward.

The container keeps its forward, so the output is the original's by
construction; with calibration on, each expert then also runs on the tokens
the original did not route to it (``TokenRecipe`` recomputes which those are),
and those outputs are discarded. Gated experts (each already run on the whole
input, its output zeroed where not routed) need no extra calls at all: the
module then only counts their tokens. Nothing is unpacked: ``restore()`` gives the
original block back.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import errors
from ..detect.plans import ContainerPlan, GatedPlan, MaskDispatchPlan, RecordedBlockPlan
from ..detect.structure import MoEStructure
from ..detect.block import identical_entries
from ..trace.dispatch import MaskDispatch
from ..trace.inputs import keyword_arguments
from .module import AdoptedMoE, KeptForwardMoE, adopt, forward_declaring, kept_forward_class
from .ops import RowComplement, inputs_seen, run_on_the_rest

__all__ = ["ContainerCalibrationMoE", "RecordedBlockMoE", "MaskDispatchMoE", "build_container_calibration",
           "build_recorded_block", "build_mask_dispatch"]


class _CalibrationContainer(nn.Module):
    """Base of ``Calibration<Container>(_CalibrationContainer, <Container>)``: original forward, then the rest."""

    structure: MoEStructure
    recipe: Any  # trace.replay.TokenRecipe; None: every expert already sees every row
    entries: list[str]

    def __init__(self, original: nn.Module, calibrate_all_experts: bool) -> None:
        adopt(self, original)
        self.calibrate_all_experts = calibrate_all_experts
        self.__dict__["_signature"] = inspect.signature(original.forward)

    def forward(self, *args, **kwargs):
        if not (self.calibrate_all_experts and self.recipe is not None):
            return self._container_forward(*args, **kwargs)
        with inputs_seen(self.experts()) as seen:
            output = self._container_forward(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs).arguments
        hidden = bound[self.structure.experts.call_roles["hidden"]]
        rows = RowComplement(hidden.reshape(-1, hidden.shape[-1]))
        for expert, module in enumerate(self.experts()):
            run_on_the_rest(module, rows, seen[expert])
        return output

    def experts(self) -> list[nn.Module]:
        return [self._modules[name] for name in self.entries]


class ContainerCalibrationMoE(AdoptedMoE):
    """The block as it is, with its experts container wrapped (nothing unpacked, so not permanent)."""

    is_permanent = False

    def _experts_for(self, experts: nn.Module, calibrate_all_experts: bool) -> nn.Module:
        return self._container_cls(experts, calibrate_all_experts)


def build_container_calibration(plan: ContainerPlan | GatedPlan, block: nn.Module) -> type[ContainerCalibrationMoE]:
    structure = plan.structure
    container = block.get_submodule(structure.experts.module_path)
    container_cls = type(container)
    names = {id(m): n for n, m in container.named_children()}
    entries = [names[id(m)] for m in identical_entries(container)]
    calibration_container = type(
        f"Calibration{container_cls.__name__}",
        (_CalibrationContainer, container_cls),
        {"structure": structure, "recipe": getattr(plan, "recipe", None), "entries": entries,
         "_container_forward": container_cls.forward,
         "forward": forward_declaring(_CalibrationContainer.forward, container_cls.forward), "__module__": __name__},
    )
    return type(
        f"Calibration{type(block).__name__}",
        (ContainerCalibrationMoE, type(block)),
        {"plan": plan, "structure": structure, "_container_cls": calibration_container, "__module__": __name__},
    )


class RecordedBlockMoE(KeptForwardMoE):
    """A block whose own loop calls its expert modules, kept as it is; calibration adds each expert's other rows,
    recomputed by the recorded ``TokenRecipe`` from the same inputs.

    With several expert sets (``detect/expert_sets.py``), each expert runs on the
    rest of the rows that reach its own set, and the sets' rows must together
    number at least the tokens (else a token reached no set: an error).
    """

    def expert_modules(self) -> list[nn.Module]:
        return [module for _, modules in self._sets() for module in modules]

    def _sets(self) -> list[tuple[Any, list[nn.Module]]]:
        """``(recipe, experts)`` of each expert set, the plan's first set first."""
        first = (self.plan.recipe, super().expert_modules())
        return [first, *((s.recipe, _weighted(self.get_submodule(s.path))) for s in self.plan.more_sets)]

    def tokens_due(self, args: tuple, kwargs: dict) -> list[int]:
        """Per expert (``expert_modules`` order), the tokens it must see with calibration on: those reaching its set
        (one set: every token)."""
        bound = keyword_arguments(self._signature, args, kwargs)
        sets = self._sets()
        if len(sets) == 1:
            return [_tokens(bound)] * len(sets[0][1])
        return [recipe.rows(bound).shape[0] for recipe, modules in sets for _ in modules]

    def watching(self):
        return inputs_seen(self.expert_modules())

    def run_unrouted(self, bound: dict, seen: list[list[torch.Tensor]]) -> None:
        sets, first = [(RowComplement(recipe.rows(bound)), modules) for recipe, modules in self._sets()], 0
        if len(sets) > 1:
            _check_every_token_reached(self, bound, [rows.source.shape[0] for rows, _ in sets])
        for rows, modules in sets:
            for expert, module in enumerate(modules, start=first):
                run_on_the_rest(module, rows, seen[expert])
            first += len(modules)


def _weighted(container: nn.Module) -> list[nn.Module]:
    """The entries of a list of experts that hold weights (not a zero or identity expert)."""
    return [m for m in container.children() if next(m.parameters(), None) is not None]


def _tokens(bound: dict) -> int:
    """The tokens of a block call: the rows of its first floating-point input."""
    hidden = next(v for v in bound.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return hidden.numel() // hidden.shape[-1]


def _check_every_token_reached(module: nn.Module, bound: dict, rows: list[int]) -> None:
    tokens = _tokens(bound)
    if sum(rows) < tokens:
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH, f"the expert sets took {' + '.join(map(str, rows))} rows of {tokens} "
            "tokens: some token reached no set, as it did on the example inputs detection ran",
            block_class=type(module).__name__,
            hints=["calibrate with calibrate_all_experts=False for this block, or " + errors.override_hint(
                type(module.__dict__["_original"]).__name__)])


def build_recorded_block(plan: RecordedBlockPlan, block: nn.Module) -> type[RecordedBlockMoE]:
    return kept_forward_class(RecordedBlockMoE, plan, block)


class MaskDispatchMoE(KeptForwardMoE):
    """A block dispatching by a mask contraction (``detect/masked.py``), kept as it is; calibration keeps that
    contraction's operands, gives each expert only the slots its mask fills where detection mapped slots to its
    input rows, and runs each expert on the tokens its mask left out."""

    @contextmanager
    def watching(self) -> Iterator[_Capture]:
        dispatch = self.plan.dispatch
        with ExitStack() as stack:
            capture = stack.enter_context(_Capture(dispatch))
            if dispatch.out_features is not None:
                for expert, module in enumerate(self.expert_modules()):
                    stack.enter_context(_filled_slots_only(module, expert, dispatch, capture))
            yield capture

    def run_unrouted(self, bound: dict, capture) -> None:
        dispatch = self.plan.dispatch
        if capture.found is None:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "the dispatch contraction found at detection did "
                                      "not run in this forward", block_class=type(self).__name__)
        mask, tokens = capture.found
        for expert, module in enumerate(self.expert_modules()):
            rows = tokens[dispatch.unrouted(mask, expert)]
            if rows.shape[0]:
                module(rows)


@contextmanager
def _filled_slots_only(module: nn.Module, expert: int, dispatch: MaskDispatch, capture: _Capture) -> Iterator[None]:
    """Within, ``module`` called on its slots gets only the rows of those the captured mask fills (none: no call).

    A pre-hook, first of the module's own, narrows the input, so that hooks
    (coverage, observers) see the tokens only; ``forward`` is wrapped for as
    long to put the outputs back in place, empty slots' outputs zero (their
    combine weight is zero). A call whose input is not one row per slot keeps
    its input.
    """
    narrowed: list[tuple[torch.Size, torch.Tensor] | None] = []

    def narrow(_, args, kwargs):
        given = args[0] if args and isinstance(args[0], torch.Tensor) and capture.found is not None else None
        filled = None if given is None or not given.dim() else dispatch.filled(capture.found[0], expert)
        if filled is None or given.numel() != filled.shape[0] * given.shape[-1]:
            narrowed.append(None)
            return None
        narrowed.append((given.shape[:-1], filled))
        return (given.reshape(-1, given.shape[-1])[filled], *args[1:]), kwargs

    original = module.forward

    def forward(*args, **kwargs):
        slots = narrowed.pop()
        if slots is None:
            return original(*args, **kwargs)
        shape, filled = slots
        if not args[0].shape[0]:
            return args[0].new_zeros(*shape, dispatch.out_features)
        rows = original(*args, **kwargs).reshape(-1, dispatch.out_features)
        outputs = rows.new_zeros(filled.shape[0], dispatch.out_features)
        outputs[filled] = rows
        return outputs.reshape(*shape, dispatch.out_features)

    handle = module.register_forward_pre_hook(narrow, with_kwargs=True, prepend=True)
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        handle.remove()
        if own is None:
            del module.forward
        else:
            module.forward = own


class _Capture(TorchFunctionMode):
    """Keeps ``(mask, tokens)``, the operands of the dispatch contraction, while a forward runs."""

    def __init__(self, dispatch: MaskDispatch) -> None:
        super().__init__()
        self.dispatch, self.seen, self.found = dispatch, 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is self.dispatch.function and self.found is None:
            operands = self.dispatch.operands(args)
            if operands is not None:
                if self.seen == self.dispatch.ordinal:
                    self.found = operands
                self.seen += 1
        return func(*args, **(kwargs or {}))


def build_mask_dispatch(plan: MaskDispatchPlan, block: nn.Module) -> type[MaskDispatchMoE]:
    return kept_forward_class(MaskDispatchMoE, plan, block)
