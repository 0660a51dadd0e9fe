"""What a detection rule returns: a typed plan when it matches, ``NoMatch`` when it does not.

A plan carries the readable facts (``MoEStructure``, what ``explain`` prints)
and, as typed fields, what its builder in ``synthesize/`` needs at run time.
Its rewrite level is its type (``level`` is a class constant, never passed in);
``describe()`` says in one line what calibration will do with the block.

``NoMatch`` is falsy and keeps its reason as a callable until someone reads it
(``str``), so a rule that fails costs no string formatting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

from .. import errors
from .structure import BlockRewrite, MoEStructure

if TYPE_CHECKING:  # the modules that make these plans import this one
    from ..trace.dispatch import MaskDispatch
    from ..trace.replay import SortedDispatch, TokenRecipe
    from .expert_sets import ExpertSet
    from .gathered_plan import GatheredDispatch
    from .last_resort import ForcedDispatch

__all__ = ["NoMatch", "Plan", "PackedExpertsPlan", "DenseExpertsPlan", "SortedBanksPlan", "GatedPlan",
           "ContainerPlan", "BlockRewritePlan", "RecordedBlockPlan", "MaskDispatchPlan", "GatheredPlan",
           "LastResortPlan", "OverridePlan"]


@dataclass(frozen=True)
class NoMatch:
    """Why a rule does not apply to a block: falsy, its reason formatted when read.

    Attributes:
        reason: the explanation, or a callable giving it.
        source: ``file:line`` of the block's code where the rule stopped, if known.
        kind: the error kind (``errors.KINDS``) a user sees if no rule matches.
        candidate: False when the block is not this rule's kind of block at all
            (the candidate test failed; nothing was run).
        shallow: the block does not dispatch the way this rule reads (a wrong call
            signature, say), as opposed to a rule that got far and then failed: a
            failure that is not shallow is the one an error leads with.
        not_moe: the rule shows that the candidate is no MoE at all (identical
            layers that no routing gates): ``convert`` and ``explain`` skip it.
        hints: what a user can do about it.
        cause: what a deep pass raised, if anything (the error's ``__cause__``).
    """

    reason: str | Callable[[], str]
    source: str | None = None
    kind: str = errors.UNSUPPORTED_DISPATCH
    candidate: bool = True
    shallow: bool = False
    not_moe: bool = False
    hints: tuple[str, ...] = ()
    cause: BaseException | None = field(default=None, repr=False, compare=False)

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason() if callable(self.reason) else self.reason

    @classmethod
    def of(cls, error: errors.AutocalError, *, shallow: bool = False) -> "NoMatch":
        """The verdict for a pass that raised ``error`` (deep passes report by exception; rules do not)."""
        return cls(error.explanation, error.source, error.kind, shallow=shallow, hints=tuple(error.hints),
                   cause=error.__cause__)


@dataclass(frozen=True)
class Plan:
    """A rule's match: the detected facts, plus what its builder needs (subclasses add typed fields)."""

    level: ClassVar[str]
    structure: MoEStructure | None

    def __post_init__(self) -> None:
        if self.structure is not None:
            self.structure.level = self.level  # the report's label, from the plan's type

    def describe(self) -> str:
        """What calibration does with the block, in one line."""
        raise NotImplementedError


@dataclass(frozen=True)
class OverridePlan(Plan):
    """A hand-written module registered for the block's class (``MoECalibrationModule.register``)."""

    level: ClassVar[str] = "override"
    module: type = None  # the registered MoECalibrationModule subclass

    def describe(self) -> str:
        return f"the registered {self.module.__name__} replaces the block"


@dataclass(frozen=True)
class PackedExpertsPlan(Plan):
    """A packed experts container called with (hidden, indices, weights): replaced by per-expert Linears."""

    level: ClassVar[str] = "experts"

    def describe(self) -> str:
        return (f"`{self.structure.experts.module_path}` is unpacked into {self.structure.experts.num_experts} "
                "experts of Linear layers; the block's forward and router stay the original's")


@dataclass(frozen=True)
class DenseExpertsPlan(Plan):
    """Packed experts run on every token, routing scores multiplying their inputs: the block graph is rewritten."""

    level: ClassVar[str] = "block-dense"
    rewrite: BlockRewrite = field(default=None, repr=False)

    def describe(self) -> str:
        return "the block graph is rewritten so that each expert also sees its tokens unscaled"


@dataclass(frozen=True)
class SortedBanksPlan(Plan):
    """Rows sorted by expert through weight banks (``detect/sorted.py``): replayed, or re-run with forced routing."""

    level: ClassVar[str] = "sorted"
    dispatch: SortedDispatch = field(default=None, repr=False)

    def describe(self) -> str:
        if self.dispatch.choice is not None:
            return "the block is re-run with its top-k forced to each group of k experts"
        return "each expert's chain of bank slices is replayed on the tokens it was not routed"


@dataclass(frozen=True)
class GatedPlan(Plan):
    """Every expert already runs on the whole input, a per-row factor gating its output: only counted."""

    level: ClassVar[str] = "gated"

    def describe(self) -> str:
        return "every expert already sees every token: the module only counts them"


@dataclass(frozen=True)
class ContainerPlan(Plan):
    """A list of experts with a dispatch loop of its own: kept, plus each expert on its other tokens."""

    level: ClassVar[str] = "container"
    recipe: TokenRecipe = field(default=None, repr=False)

    def describe(self) -> str:
        return (f"`{self.structure.experts.module_path}` keeps its loop; each expert then runs on the tokens "
                "its recorded token recipe did not give it")


@dataclass(frozen=True)
class BlockRewritePlan(Plan):
    """A block gathering each expert's rows in code fx traces: its graph gets a call per expert on the rest."""

    level: ClassVar[str] = "block"
    rewrite: BlockRewrite = field(default=None, repr=False)

    def describe(self) -> str:
        return "the block graph is rewritten: after each expert call, the expert runs on the rows it was not given"


@dataclass(frozen=True)
class RecordedBlockPlan(Plan):
    """A block dispatching in code fx cannot trace: kept, each expert's rows learnt as a replayed recipe."""

    level: ClassVar[str] = "recorded-block"
    recipe: TokenRecipe = field(default=None, repr=False)
    more_sets: tuple[ExpertSet, ...] = field(default=(), repr=False)  # lists beyond the first, each its own recipe

    def describe(self) -> str:
        if self.more_sets:
            return (f"the block keeps its forward; each expert of its {len(self.more_sets) + 1} expert sets then runs "
                    "on the rows of its set its recorded recipe did not give it")
        return "the block keeps its forward; each expert then runs on the rows its recorded recipe did not give it"


@dataclass(frozen=True)
class MaskDispatchPlan(Plan):
    """Dispatch by a 0/1 mask contraction (``detect/masked.py``): kept, plus each expert on the tokens left out."""

    level: ClassVar[str] = "mask-dispatch"
    dispatch: MaskDispatch = field(default=None, repr=False)

    def describe(self) -> str:
        if self.dispatch is None or self.dispatch.out_features is None:
            return "the block keeps its forward; each expert then runs on the tokens its dispatch mask left out"
        return ("the block keeps its forward, each expert given only the capacity slots its dispatch mask fills; "
                "each expert then runs on the tokens the mask left out")


@dataclass(frozen=True)
class GatheredPlan(Plan):
    """Expert weights gathered by the routing indices (``detect/gathered.py``): re-run with forced routing."""

    level: ClassVar[str] = "gathered"
    dispatch: GatheredDispatch = field(default=None, repr=False)

    def describe(self) -> str:
        if self.dispatch is not None and (self.dispatch.slots or self.dispatch.rows):
            return ("the block keeps its forward, one Linear per expert; with calibration on every token fills "
                    "every expert's rows, and each row the block wrote gets its own token's output")
        if self.dispatch is not None and self.dispatch.choice is None:
            return "the block keeps its forward, every expert already on every token, one Linear per expert"
        return "the block is re-run with its routing forced to each group of k experts, one Linear per expert"


@dataclass(frozen=True)
class LastResortPlan(Plan):
    """Only a routing choice found (``detect/last_resort.py``): re-run with it forced to each group of experts."""

    level: ClassVar[str] = "last-resort"
    dispatch: ForcedDispatch = field(default=None, repr=False)

    def describe(self) -> str:
        return (f"the block keeps its forward; with calibration on it runs {len(self.dispatch.runs)} more times, "
                "its routing forced to each group of experts, each expert observed on every token once")
