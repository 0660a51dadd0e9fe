"""Coverage: the tokens each expert Linear saw while LLM Compressor's calibration hooks were live,
and the quantization parameters it holds afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ... import errors
from ...linear_calls import register_group_hook
from .blocks import _listing, calibration_blocks, expert_linears

__all__ = [
    "Coverage",
    "CoverageError",
    "CoverageTracker",
    "LinearCoverage",
    "check_coverage",
    "coverage",
]


class CoverageError(errors.AutocalError, AssertionError):
    """An expert Linear was not fully calibrated."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(errors.CALIBRATION_COVERAGE, _listing("coverage", problems))


def _lc_hooks_live(or_kept: bool = False) -> bool:
    """Are LLM Compressor's calibration hooks enabled now (not a propagation pass)?

    With ``or_kept``: could any of its hooks run (some kept enabled by ``disable_hooks(keep=…)``)?
    """
    try:
        from llmcompressor.modifiers.utils.hooks import HooksMixin
    except ImportError:  # pragma: no cover - without the extra every pass counts
        return True
    return not HooksMixin._HOOKS_DISABLED or (or_kept and bool(HooksMixin._HOOKS_KEEP_ENABLED))


def _rows(value: Any) -> int | None:
    if not isinstance(value, torch.Tensor) or type(value).__name__ == "Proxy" or value.device.type == "meta":
        return None
    return value.numel() // value.shape[-1] if value.dim() else None


class CoverageTracker:
    """Counts, while LLM Compressor's hooks are live, the tokens each block and each expert Linear receive.

    Example:
        >>> with CoverageTracker(model) as tracker:          # doctest: +SKIP
        ...     llmcompressor.oneshot(model=model, ...)
        >>> coverage(model, tracker).check()
    """

    def __init__(self, model: nn.Module, *, only_live_hooks: bool = True) -> None:
        self.model = model
        self.only_live_hooks = only_live_hooks
        self.block_tokens: dict[str, int] = {}
        self.linear_tokens: dict[str, int] = {}
        self._handles: list = []

    def _counter(self, table: dict[str, int], key: str):
        def hook(module, args, kwargs=None):  # AutoRound's Linear wrappers call pre-hooks as hook(module, args)
            if self.only_live_hooks and not _lc_hooks_live():
                return
            first = next((v for v in (*args, *(kwargs or {}).values()) if isinstance(v, torch.Tensor)), None)
            rows = _rows(first)
            if rows is not None:
                table[key] += rows
        return hook

    def __enter__(self) -> "CoverageTracker":
        for path, block in calibration_blocks(self.model):
            self.block_tokens.setdefault(path, 0)
            self._handles.append(block.register_forward_pre_hook(self._counter(self.block_tokens, path),
                                                                 with_kwargs=True))
        counted, path_of = [], {}
        for linear in expert_linears(self.model):
            self.linear_tokens.setdefault(linear.path, 0)
            module = self.model.get_submodule(linear.path)
            path_of[module] = linear.path
            counted.append((module, module.register_forward_pre_hook(self._counter(self.linear_tokens, linear.path),
                                                                     with_kwargs=True)))
        self._handles += [handle for _, handle in counted]
        self._handles.append(register_group_hook(lambda *call: self._count_group(path_of, *call), counted))
        return self

    def _count_group(self, path_of: dict[nn.Module, str], linears: Sequence[nn.Module],
                     inputs: Sequence[torch.Tensor]) -> None:
        """The counting hooks of Linears computed together (``autocal.linear_calls``), in one call."""
        if self.only_live_hooks and not _lc_hooks_live():
            return
        for linear, inp in zip(linears, inputs):
            rows = _rows(inp)
            if rows is not None:
                self.linear_tokens[path_of[linear]] += rows

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


QPARAM_SUFFIXES = ("_scale", "_zero_point", "_global_scale")


def _required_qparams(scheme: Any) -> list[str]:
    """Parameters a calibrated Linear must hold under a compressed-tensors ``QuantizationScheme``."""
    required = []
    for base, args in (("weight", getattr(scheme, "weights", None)),
                       ("input", getattr(scheme, "input_activations", None)),
                       ("output", getattr(scheme, "output_activations", None))):
        if args is None:
            continue
        dynamic = getattr(args, "dynamic", False)
        dynamic = getattr(dynamic, "value", dynamic)
        strategy = getattr(getattr(args, "strategy", None), "value", getattr(args, "strategy", None))
        if dynamic is False or dynamic == "false":
            required.append(f"{base}_scale")
        if strategy == "tensor_group":
            required.append(f"{base}_global_scale")
    return required


@dataclass
class LinearCoverage:
    """One expert Linear after calibration."""

    path: str
    block: str
    expert: int
    name: str
    tokens: int | None
    block_tokens: int | None
    scheme: bool | None  # None: nothing in the model has a scheme (a recipe that prunes, say), so none is expected
    qparams: dict[str, tuple[int, ...]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    # Scales holding a 0. A negative scale is valid: AutoRound's symmetric scales carry a sign.
    zero: list[str] = field(default_factory=list)

    def problems(self, require_all_tokens: bool = True) -> list[str]:
        out = []
        if self.scheme is False:
            out.append(f"{self.path}: no quantization scheme (not targeted, or ignored)")
        if self.missing:
            out.append(f"{self.path}: missing quantization parameters {self.missing}")
        if self.nonfinite:
            out.append(f"{self.path}: NaN/inf in {self.nonfinite}")
        if self.zero:
            out.append(f"{self.path}: a scale of 0 in {self.zero}")
        if self.tokens is not None:
            if self.tokens == 0:
                out.append(f"{self.path}: saw no calibration token")
            elif require_all_tokens and self.block_tokens is not None and self.tokens != self.block_tokens:
                out.append(f"{self.path}: saw {self.tokens} of the {self.block_tokens} tokens its block received")
        return out


@dataclass
class Coverage:
    """Per expert Linear: calibration tokens seen and quantization parameters."""

    linears: list[LinearCoverage]
    block_tokens: dict[str, int] = field(default_factory=dict)
    require_all_tokens: bool = True

    def problems(self) -> list[str]:
        problems = [p for lc in self.linears for p in lc.problems(self.require_all_tokens)]
        if not self.linears:
            problems.append("no expert Linear found: is the model converted (autocal_lc.prepare)?")
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems()

    def check(self) -> "Coverage":
        """Raise ``CoverageError`` listing every problem; return self when there is none."""
        problems = self.problems()
        if problems:
            raise CoverageError(problems)
        return self

    def tokens_per_expert(self, block: str) -> dict[int, dict[str, int | None]]:
        table: dict[int, dict[str, int | None]] = {}
        for lc in self.linears:
            if lc.block == block:
                table.setdefault(lc.expert, {})[lc.name] = lc.tokens
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"block_tokens": self.block_tokens, "linears": [lc.__dict__ for lc in self.linears],
                "problems": self.problems()}

    def table(self, block: str) -> str:
        """Tokens seen per expert (rows) and Linear (columns) of one block, with the qparams present."""
        rows = self.tokens_per_expert(block)
        names = sorted({n for r in rows.values() for n in r})
        qparams = {lc.expert: sorted(lc.qparams) for lc in self.linears if lc.block == block}
        lines = [f"{block} (block saw {self.block_tokens.get(block, '?')} tokens)",
                 "  expert  " + "  ".join(f"{n:>10}" for n in names) + "  qparams"]
        for expert in sorted(rows):
            cells = "  ".join(f"{str(rows[expert].get(n, '-')):>10}" for n in names)
            lines.append(f"  {expert:>6}  {cells}  {','.join(qparams.get(expert, []))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        blocks = list(dict.fromkeys(lc.block for lc in self.linears))
        lines = [f"coverage: {len(self.linears)} expert Linears in {len(blocks)} block(s): "
                 f"{'OK' if self.ok else 'FAILED'}"]
        for block in blocks:
            mine = [lc for lc in self.linears if lc.block == block]
            tokens = [lc.tokens for lc in mine if lc.tokens is not None]
            experts = len({lc.expert for lc in mine})
            qnames = sorted({q for lc in mine for q in lc.qparams})
            seen = f"tokens per expert Linear min {min(tokens)} max {max(tokens)}" if tokens else "tokens not tracked"
            lines.append(f"  {block}: {experts} experts, block saw {self.block_tokens.get(block, '?')} tokens, "
                         f"{seen}; qparams {qnames}")
        for problem in self.problems()[:20]:
            lines.append(f"  ! {problem}")
        return "\n".join(lines)


def coverage(model: nn.Module, tracker: CoverageTracker | None = None, *,
             require_all_tokens: bool = True) -> Coverage:
    """Quantization parameters of every expert Linear (and, with a tracker, the tokens each saw)."""
    result, checks = [], []
    tracked = tracker is not None and any(tracker.block_tokens.values())  # data-free recipes run no forward
    quantized = any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())
    for linear in expert_linears(model):
        module = model.get_submodule(linear.path)
        scheme = getattr(module, "quantization_scheme", None)
        tensors = _qparams(module)
        required = _required_qparams(scheme) if scheme is not None else []
        entry = LinearCoverage(
            path=linear.path, block=linear.block, expert=linear.expert, name=linear.name,
            tokens=tracker.linear_tokens.get(linear.path) if tracked else None,
            block_tokens=tracker.block_tokens.get(linear.block) if tracked else None,
            scheme=scheme is not None if quantized else None,
            qparams={n: tuple(t.shape) for n, t in tensors.items()},
            missing=[n for n in required if n not in tensors],
        )
        checks += [(entry, name, tensor) for name, tensor in tensors.items()]
        result.append(entry)
    _check_values(checks)
    return Coverage(result, dict(tracker.block_tokens) if tracker else {}, require_all_tokens)


def _qparams(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own quantization parameters and buffers, read by name: reading every parameter would bring
    each offloaded weight to the device (compressed-tensors' offloading hands parameters out that way)."""
    tensors = {}
    for table in (module._parameters, module._buffers):
        for name in [n for n in table if n.endswith(QPARAM_SUFFIXES)]:
            if table[name] is not None:
                tensors[name] = table[name]
    return tensors


def _check_values(checks: list[tuple[LinearCoverage, str, torch.Tensor]]) -> None:
    """Note NaN/inf and zero scales on each entry. The flags are read from their device at once: one wait for
    a GPU, not one per tensor."""
    flags = []
    for _, name, tensor in checks:
        values = tensor.detach()
        values = values.float() if values.is_floating_point() and values.dtype.itemsize == 1 else values
        no = torch.zeros((), dtype=torch.bool, device=values.device)
        nonfinite = ~torch.isfinite(values).all() if values.is_floating_point() else no
        zero = (values == 0).any() if name.endswith("scale") and values.numel() else no
        flags.append(torch.stack([nonfinite, zero]))
    for (entry, name, _), (nonfinite, zero) in zip(checks, _read(flags)):
        if nonfinite:
            entry.nonfinite.append(name)
        elif zero:
            entry.zero.append(name)


def _read(tensors: list[torch.Tensor]) -> list[list]:
    """``t.tolist()`` for each tensor (all of one shape), with one copy to the host per device."""
    positions: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        positions.setdefault(tensor.device, []).append(position)
    read: list[list] = [[] for _ in tensors]
    for device_positions in positions.values():
        for position, values in zip(device_positions, torch.stack([tensors[p] for p in device_positions]).tolist()):
            read[position] = values
    return read


def check_coverage(model: nn.Module, tracker: CoverageTracker | None = None) -> Coverage:
    """``coverage(model, tracker).check()``."""
    return coverage(model, tracker).check()
