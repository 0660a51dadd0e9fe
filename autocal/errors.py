"""Errors with stable kinds.

Every error autocal raises is an :class:`AutocalError` whose ``kind`` is one of
the constants below. A kind has one docs page (``docs/errors/<kind>.md``); the
message names the block class, the module path, the source line where analysis
stopped, and what to do next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "AutocalError",
    "NO_MOE_BLOCK",
    "TRACE_FAILED",
    "UNSUPPORTED_DISPATCH",
    "UNSUPPORTED_EXPERT",
    "VERIFICATION_FAILED",
    "BAD_OVERRIDE",
    "NOT_RESTORABLE",
    "HOOKED_MODULE",
    "CHECKPOINT_LAYOUT",
    "CALIBRATION_COVERAGE",
    "LINEARIZATION_CONFLICT",
    "BAD_INPUT",
    "KINDS",
    "next_steps",
]

NO_MOE_BLOCK = "no-moe-block"
TRACE_FAILED = "trace-failed"
UNSUPPORTED_DISPATCH = "unsupported-dispatch"
UNSUPPORTED_EXPERT = "unsupported-expert"
VERIFICATION_FAILED = "verification-failed"
BAD_OVERRIDE = "bad-override"
NOT_RESTORABLE = "not-restorable"
HOOKED_MODULE = "hooked-module"
CHECKPOINT_LAYOUT = "checkpoint-layout"
CALIBRATION_COVERAGE = "calibration-coverage"
LINEARIZATION_CONFLICT = "linearization-conflict"
BAD_INPUT = "bad-input"

KINDS = {
    NO_MOE_BLOCK: "the module holds no block that routes tokens to experts",
    TRACE_FAILED: "the block's forward could not be run or recorded",
    UNSUPPORTED_DISPATCH: "the way tokens reach the experts was not recognised",
    UNSUPPORTED_EXPERT: "one expert's computation could not be turned into Linear layers",
    VERIFICATION_FAILED: "the calibration module's output differs from the original's",
    BAD_OVERRIDE: "a registered calibration module breaks the contract",
    NOT_RESTORABLE: "the module was converted permanently and cannot be restored",
    HOOKED_MODULE: "the block's forward was replaced by a dispatch or offload hook",
    CHECKPOINT_LAYOUT: "a state dict lacks the per-expert layout vLLM and transformers load; nothing was written",
    CALIBRATION_COVERAGE: "an expert Linear was not fully calibrated (tokens, missing or non-finite scales)",
    LINEARIZATION_CONFLICT: "LLM Compressor would replace modules inside a block autocal converted",
    BAD_INPUT: "an argument is not what the function takes (example inputs not a dict, a model not prepared)",
}

OVERRIDE_HINT = (
    "register a hand-written module: "
    "@autocal.MoECalibrationModule.register('{cls}') on a subclass of "
    "autocal.MoECalibrationModule (see docs/overrides.md)"
)


@dataclass
class AutocalError(Exception):
    """An error a user can act on.

    Attributes:
        kind: stable identifier, one of ``KINDS``.
        explanation: what went wrong, in the user's terms.
        block_class: class name of the MoE block concerned, if any.
        module_path: dotted path of the module in the model, if known.
        source: ``file:line`` of the user code where analysis stopped, if known.
        hints: what to do next.
    """

    kind: str
    explanation: str
    block_class: str | None = None
    module_path: str | None = None
    source: str | None = None
    hints: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown error kind {self.kind!r}")
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ", ".join(
            part
            for part in (
                self.block_class and f"block {self.block_class}",
                self.module_path and f"at {self.module_path}",
                self.source and f"source {self.source}",
            )
            if part
        )
        lines = [f"[{self.kind}] {self.explanation}" + (f" ({where})" if where else "")]
        lines += [f"  hint: {hint}" for hint in self.hints]
        lines.append(f"  docs: docs/errors/{self.kind}.md")
        return "\n".join(lines)

    def with_context(self, *, module_path: str | None = None, block_class: str | None = None) -> "AutocalError":
        """The same error, with the module path and class filled in where missing."""
        self.module_path = self.module_path or module_path
        self.block_class = self.block_class or block_class
        self.args = (str(self),)
        return self


class NotAnMoE(Exception):
    """A candidate with no router turned out not to gate experts per row: not an MoE, so nothing to report.

    Raised where the rules' verdicts say so (``autocal/rules.py``); ``convert`` and ``explain`` skip such candidates.
    """


def override_hint(block_class: str) -> str:
    return OVERRIDE_HINT.format(cls=block_class)


# What to do next when an error of a kind carries no hint of its own. A hand-written
# module is the way out only where autocal's analysis is what stopped.
_OVERRIDE_KINDS = (NO_MOE_BLOCK, UNSUPPORTED_DISPATCH, UNSUPPORTED_EXPERT, VERIFICATION_FAILED)
_NEXT = {
    TRACE_FAILED: "pass example inputs of the whole model: autocal.convert(model, example_inputs={...})",
    HOOKED_MODULE: "convert the model before dispatching or offloading it",
    BAD_OVERRIDE: "fix the registered module so that it keeps the contract (see docs/overrides.md)",
}


def next_steps(kind: str, block_class: str, hints: list[str] | None = None) -> list[str]:
    """What to do next about an error of ``kind``: its own hints, else the step that fits the kind."""
    if hints:
        return list(hints)
    if kind in _OVERRIDE_KINDS:
        return [override_hint(block_class)]
    return [_NEXT.get(kind, f"see docs/errors/{kind}.md")]
