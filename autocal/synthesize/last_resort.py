"""Calibration by the rule of last resort (``detect/last_resort.py``): the block's forward, then forced runs.

The block keeps its forward: with calibration off it is the original's call,
bitwise. With calibration on, the real forward runs with every expert quiet
(their hooks held: its output is the block's output), then the block runs once
per forced run found at detection, its routing choices forced, with only that
run's experts observed (``synthesize/forced.forced_runs``). An expert split over
parallel lists (``w1[e]``, ``w3[e]``, ``w2[e]``) is held or observed whole. Each expert sees
every token once, as the router would have given it. Each forced run is checked
as it goes: an observed expert given other than one row per token raises,
since the forcing learnt on the example inputs does not hold on these.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from .. import errors
from ..detect.plans import LastResortPlan
from ..trace.inputs import keyword_arguments
from .forced import forced_runs, hooks_held
from .module import KeptForwardMoE, kept_forward_class

__all__ = ["LastResortMoE", "build_last_resort"]


class LastResortMoE(KeptForwardMoE):
    """The block as it is; with calibration on, also re-run with its routing forced (module docstring)."""

    def expert_modules(self) -> list[nn.Module]:
        """Each expert's entry of its list: the module given its token rows (where tokens are counted)."""
        container = self.experts_container
        return [container._modules[name] for name in self.plan.dispatch.entries]

    def expert_parts(self) -> list[list[nn.Module]]:
        """Each expert's modules: its entry of its list, then its entries of the lists parallel to it (one list per
        projection: ``w1[e]``, ``w3[e]``, ``w2[e]``); all are held or observed together."""
        parts = [[expert] for expert in self.expert_modules()]
        for path, names in self.plan.dispatch.parallel:
            container = self.get_submodule(path)
            for part, name in zip(parts, names):
                part.append(container._modules[name])
        return parts

    def forward(self, *args, **kwargs):
        if not self.calibrate_all_experts:
            return self._block_forward(*args, **kwargs)
        dispatch, experts = self.plan.dispatch, self.expert_parts()
        hidden = keyword_arguments(self._signature, args, kwargs)[dispatch.hidden]
        tokens = hidden.numel() // hidden.shape[-1]
        runs = [(run.forcing(), set(run.observed)) for run in dispatch.runs]
        governed = {id(m) for parts in experts for part in parts for m in part.modules()}
        return forced_runs(self, runs, lambda observed: self._observing(experts, observed, tokens), governed,
                           args, kwargs)

    @contextmanager
    def _observing(self, experts: list[list[nn.Module]], observed: set[int], tokens: int) -> Iterator[None]:
        """Within, only the ``observed`` experts (each its parts) run with their hooks; after, each must have had
        every token once (counted on its first part, the one given the token rows)."""
        quiet = [m for e, parts in enumerate(experts) if e not in observed for part in parts for m in part.modules()]
        rows = {e: 0 for e in observed}

        def counter(expert: int):
            def count(module, args, kwargs):
                first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                rows[expert] += first.numel() // first.shape[-1] if first is not None and first.dim() else 0
            return count

        with ExitStack() as stack:
            stack.enter_context(hooks_held(quiet))
            for e in observed:
                stack.callback(experts[e][0].register_forward_pre_hook(counter(e), with_kwargs=True).remove)
            yield
        short = {e: n for e, n in rows.items() if n != tokens}
        if short:
            expert, given = next(iter(short.items()))
            raise errors.AutocalError(
                errors.UNSUPPORTED_DISPATCH, f"with its routing forced, expert {expert} was given {given} rows for "
                f"{tokens} tokens: the forcing learnt on the example inputs does not hold on this input",
                block_class=type(self).__name__,
                hints=["calibrate with calibrate_all_experts=False for this block, or " + errors.override_hint(
                    type(self.__dict__["_original"]).__name__)])


def build_last_resort(plan: LastResortPlan, block: nn.Module) -> type[LastResortMoE]:
    return kept_forward_class(LastResortMoE, plan, block)
