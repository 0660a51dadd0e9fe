"""``Facts``: what the rules read about one block, each fact computed once and shared between rules.

The candidate tests (does the block hold experts of a rule's kind?) read only
the block's parameters and children. Example inputs and recordings are made
when a rule first asks for them and kept, so that two rules reading one
recording (the gated rule and the container rule, say) record once.

``parent`` is the module holding the block, when the block was found by
walking a model: a router may sit beside the experts' holder rather than in it,
and a module that is its parent's experts container is not a block of its own.
A block given alone (``synthesize(block)``, or a block whose experts are used
through methods of a child, located by its callers) has no parent; weight banks
one level down then count as its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

from torch import nn

from .. import errors
from ..trace.inputs import BlockCall, capture_block_inputs
from .block import expert_lists, has_own_forward, unrouted_lists
from .storage import (expert_tables, listed_weights, own_expert_weights, packed_parameters, projection_children,
                      projection_weights, router_rows, side_by_side_weights)
from .sorted import banks_of_a_child, weight_banks

__all__ = ["Facts", "experts_container", "routes_itself"]


def experts_container(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The block's child that stores expert weights packed, if any.

    A child with a router-shaped weight of its own, in a module holding nothing
    beside it, is a block (``own_expert_weights``) that the module only wraps. A
    child whose router is a module of its own beside its packed weights
    (``routes_itself``) is a block too, whatever else the module holds: a decoder
    layer around ``self.moe`` only calls the block; unless the module holds a
    router for those experts itself (a per-expert ``[E, H]`` norm scale inside the
    container, as transformers' ergo has, looks like a router too).
    """
    for name, child in block.named_children():
        inside = {id(t) for t in (*child.parameters(), *child.buffers())}
        wraps = not any(id(t) not in inside for t in (*block.parameters(), *block.buffers()))
        packed = packed_parameters(child, router_rows(block, child))
        outside = [p for p in block.parameters() if id(p) not in inside]
        routed_here = _router_shaped(outside, packed)  # the block's own router scores these experts
        if packed and not (wraps and own_expert_weights(child)) and (routed_here or not routes_itself(child, packed)):
            return name, child
    return None


def routes_itself(module: nn.Module, packed: dict[str, nn.Parameter]) -> bool:
    """Does ``module`` hold, outside its ``packed`` expert weights, a router-shaped ``[E, H]`` weight?

    The packed weights' 2-D companions (biases, ``[E, d]``) are among ``packed``, so
    only a weight of another parameter set (a router Linear) counts.
    """
    inside = {id(p) for p in packed.values()}
    return _router_shaped([w for w in module.parameters() if id(w) not in inside], packed)


def _router_shaped(weights: list[nn.Parameter], packed: dict[str, nn.Parameter]) -> bool:
    """Is one of ``weights`` an ``[E, H]`` router for the ``[E, …, H, …]`` packed expert weights (or ``[H, E]``, as
    code multiplying by it stores it)?"""
    shapes = [p.shape for p in packed.values() if p.dim() >= 3]
    return any(w.dim() == 2 and any(r[0] == s[0] and r[1] in s[1:] for s in shapes for r in (w.shape, w.shape[::-1]))
               for w in weights)


def _among(module: nn.Module, weights: dict[str, nn.Parameter]) -> bool:
    """Does ``module`` hold one of ``weights``?"""
    ids = {id(p) for p in weights.values()}
    return any(id(p) in ids for p in module.parameters())


def _one_of_projections(module: nn.Module, parent: nn.Module) -> bool:
    """Is ``module`` one of two or more children of ``parent`` each holding one projection of every expert? Its
    ``[E, a]`` companion is then its bias, not a router: the block routing to those experts is further up."""
    projections = projection_children(parent)
    return len(projections) >= 2 and _among(module, projections)


def _unbanked(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's projection weights (``projection_weights``) but those of a child holding weight banks: such a
    child (bias-free ``[E, a, b]`` projections called with rows and counts, Aria's ``experts.fc1``) is read by the
    sorted-banks rule, as a block of its own where the model is walked; read here too, the block holding it would
    be a second block over the same experts."""
    banked = {id(p) for _, child in block.named_children() for p in weight_banks(child).values()}
    return {n: p for n, p in projection_weights(block).items() if id(p) not in banked}


@dataclass
class Facts:
    """One block and what is known about it (see the module docstring)."""

    block: nn.Module
    call: BlockCall | None = None
    num_tokens: int | None = None
    parent: nn.Module | None = None
    walked: bool = False  # found by walking a model (``parent`` is the module above, None for the model itself)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def block_class(self) -> str:
        return type(self.block).__name__

    @cached_property
    def packed(self) -> tuple[str, nn.Module] | None:
        """``(name, container)``: a child storing the experts' weights packed."""
        return experts_container(self.block)

    @cached_property
    def banks(self) -> dict[str, nn.Parameter]:
        """Weight banks ``[E, a, b]`` of the block's children, by path (``detect/sorted.py``); of a child's children
        where the router beside that child is the block's own (the child, a block too, is tried first: ``convert``)."""
        own = weight_banks(self.block)
        found = own or banks_of_a_child(self.block)
        if not self.walked or not found:
            return found
        holders = {path.split(".")[0] for path in found}  # the children holding the banks
        inside = {id(p) for holder in holders for p in self.block.get_submodule(holder).parameters()}
        rows = {p.shape[0] for p in self.block.parameters() if p.dim() == 2 and id(p) not in inside}
        if own and self.parent is not None:  # banks a level down need a router of the block's own
            rows |= router_rows(self.parent, self.block)
        return found if next(iter(found.values())).shape[0] in rows else {}

    @cached_property
    def lists(self) -> dict[str, list[nn.Module]]:
        """Children holding two or more identical experts made of Linears: routed ones, else unrouted ones."""
        return expert_lists(self.block) or unrouted_lists(self.block)

    @property
    def list_name(self) -> str:
        return next(iter(self.lists))

    @property
    def entries(self) -> list[nn.Module]:
        return self.lists[self.list_name]

    @property
    def list_container(self) -> nn.Module:
        return self.block.get_submodule(self.list_name)

    @property
    def own_loop(self) -> bool:
        """Does the list of experts dispatch in a forward of its own?"""
        return bool(self.lists) and has_own_forward(self.list_container)

    @property
    def unrouted(self) -> bool:
        """No router-shaped weight beside the list: an MoE only if its experts turn out gated per row."""
        return not expert_lists(self.block)

    @cached_property
    def own_weights(self) -> dict[str, nn.Parameter]:
        """Expert weights of the block, with a router beside them, that its forward may gather per expert: its own
        ``[E, a, b]`` parameters, those of children holding one projection of every expert each, or a child's
        weights holding every expert side by side (not its parent's packed experts or projections)."""
        found = own_expert_weights(self.block) | _unbanked(self.block) | side_by_side_weights(self.block)
        if found and self.parent is not None and ((experts_container(self.parent) or (None, None))[1] is self.block
                                                  or _among(self.block, projection_weights(self.parent))
                                                  or _one_of_projections(self.block, self.parent)):
            return {}
        return found

    @cached_property
    def listed(self) -> dict[str, list[nn.Parameter]]:
        """Lists of one weight per expert (``nn.ParameterList``) with a router beside them: packed storage, entry
        ``e`` for slice ``e`` (``detect/listed.py``)."""
        return listed_weights(self.block)

    @cached_property
    def tables(self) -> dict[str, nn.Parameter]:
        """Embedding tables of one shape: one vector per expert (``detect/gathered.py``)."""
        return expert_tables(self.block)

    def inputs(self, experts: nn.Module, default_tokens: int) -> BlockCall:
        """The block's example inputs: the caller's, else made so that ``experts`` get called."""
        if self.call is None:
            self.call = self.memo("inputs", lambda: capture_block_inputs(
                self.block, experts, num_tokens=self.num_tokens or default_tokens))
        return self.call

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per key for this block (a recording several rules read); its error, raised again."""
        if key not in self._memo:
            try:
                self._memo[key] = compute()
            except errors.AutocalError as error:
                self._memo[key] = error
        if isinstance(self._memo[key], errors.AutocalError):
            raise self._memo[key]
        return self._memo[key]
