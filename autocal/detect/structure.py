"""``MoEStructure``: everything detection found in one MoE block class.

It is the single input of ``explain`` (the readable facts) and of
``synthesize`` (the facts plus the expert template). Each fact keeps the source
``file:line`` it came from in ``sources``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

__all__ = ["BlockRewrite", "ExpertCall", "RouterInfo", "ExpertsInfo", "ExpertTemplate", "LinearRecipe", "MoEStructure", "Projection"]


@dataclass
class RouterInfo:
    """How the block picks experts: read from the recorded block forward."""

    module_path: str | None
    scoring: str | None
    top_k: int
    num_choices: int
    renormalized: bool
    correction_bias: str | None
    grouped: bool
    scaling: float | None
    sources: dict[str, str] = field(default_factory=dict)
    selection: str = "topk"
    scored_after_selection: bool = False
    dynamic_k: tuple[int, int] | None = None  # a threshold choice (top-p): the fewest and most experts of a token


@dataclass
class LinearRecipe:
    """How to view expert ``e``'s weight (and bias) of one synthesized Linear.

    ``weight(container, e)`` returns a ``[out, in]`` view of the packed
    parameters; ``bias`` likewise or ``None``.
    """

    name: str
    weight: Any
    bias: Any
    in_features: int
    out_features: int
    packed_param: str
    note: str


@dataclass
class Projection:
    """Linears cut from one matmul of the original expert, and how to run that matmul.

    ``operand(container, e)`` is the weight operand the original passed to
    ``op`` (``"linear"``: ``F.linear(x, W)``; ``"matmul"``: ``x @ W``);
    ``columns`` are the output columns each Linear in ``linears`` computes.
    """

    linears: tuple[str, ...]
    columns: tuple[slice, ...]
    features: int
    operand: Any
    op: str
    bias: Any
    bias_in_op: bool


@dataclass
class ExpertTemplate:
    """One expert's computation, as a graph over its Linear layers.

    ``graph`` has placeholders ``x`` (the expert's input rows) and, when the
    experts weight their own outputs, ``routing_weight`` (``[rows, 1]``); its
    ``call_module`` nodes name entries of ``linears``.
    """

    graph: fx.Graph
    linears: list[LinearRecipe]
    uses_routing_weight: bool
    output_dtype: Any = None
    computation: str = ""
    weight_applied_last: bool = False
    projections: list[Projection] = field(default_factory=list)


@dataclass
class ExpertsInfo:
    """The experts container and how the block calls it."""

    module_path: str
    num_experts: int
    storage: str
    layout: dict[str, Any]
    computation: str
    weights_applied: str
    call_roles: dict[str, str]
    output_features: int
    accumulate_dtype: str | None
    output_dtype: str | None
    sources: dict[str, str] = field(default_factory=dict)
    linear_views: list[str] = field(default_factory=list)  # Linear-like modules (block paths) seen as nn.Linear
    template: ExpertTemplate | None = field(default=None, repr=False)  # experts with no Linear: cut into Linears
    # lists (block paths) whose entry e is part of expert e too: one list per projection (``detect/parallel.py``);
    # shown in ``layout``, so not repeated in the report
    parallel: list[str] = field(default_factory=list, repr=False)


@dataclass
class ExpertCall:
    """One call of expert ``expert`` in a block graph, and the rows it received: ``source[tokens]``."""

    node: fx.Node
    expert: int
    source: fx.Node
    tokens: fx.Node


@dataclass
class BlockRewrite:
    """The block's symbolic graph and its expert calls (block-level rewrite)."""

    graph: fx.Graph
    calls: list[ExpertCall]


@dataclass
class MoEStructure:
    """What one MoE block class does, as detected from its recorded forward."""

    block_class: str
    router: RouterInfo
    experts: ExpertsInfo
    shared_modules: list[str]
    returns: str
    template: ExpertTemplate | None = field(default=None, repr=False, compare=False)
    level: str = ""  # the rewrite level: set by the plan that carries this structure (``detect/plans.py``)
    more_sets: list[tuple[RouterInfo, ExpertsInfo]] = field(default_factory=list)  # other expert lists, own routers

    def __post_init__(self) -> None:
        """A router that looks its experts up (hash routing) has no scores to count its choices by: they are the
        experts."""
        if self.router.num_choices < 2:
            self.router.num_choices = self.experts.num_experts

    def to_dict(self) -> dict[str, Any]:
        data = {"block_class": self.block_class, "level": self.level}  # in the order the report has always had
        skipped = ("template", *data, *(("more_sets",) if not self.more_sets else ()))
        data.update((k, v) for k, v in self.__dict__.items() if k not in skipped)
        return _plain(data)


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):  # fields left out of repr (graphs, recipes) are no facts to show
        return {k: _plain(getattr(value, k)) for k, f in value.__dataclass_fields__.items() if f.repr}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
