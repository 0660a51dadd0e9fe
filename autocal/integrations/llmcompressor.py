"""LLM Compressor on autocal-converted models (extra ``autocal[llmcompressor]``).

Pinned to the stack LLM Compressor users run: llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0. autocal's core never imports
this module; this module imports llmcompressor lazily, inside the functions
that need it, so importing it without the extra installed works.

The flow (see ``docs/llmcompressor.md``)::

    from autocal.integrations import llmcompressor as autocal_lc

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
    autocal_lc.prepare(model)                        # convert every MoE block, guard, name checkpoint keys
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=autocal_lc.default_ignore(model))
    coverage = autocal_lc.oneshot(model, recipe=recipe, dataset=ds, processor=tokenizer)
    print(coverage)                                  # tokens per expert Linear, qparams present and finite
    autocal_lc.save_pretrained(model, out_dir)       # checked before writing, verified after reload

What each step guarantees:

- ``prepare`` converts with ``autocal.convert`` and checks that LLM Compressor's
  own MoE linearization (``oneshot`` calls ``linearize_moe`` on every module
  ``get_non_linearized_moes`` returns) finds nothing inside a converted block.
  It then teaches the model, through transformers' own save-time conversion
  mapping (``model._weight_conversions``), to write expert keys with the names
  the model's original checkpoint uses (Mixtral: ``block_sparse_moe.experts.{i}.w1``).
- ``default_ignore`` / ``gate_modules``: the routers autocal detected (and bare
  Linear gates of shared experts), never a list of names.
- ``oneshot`` runs ``llmcompressor.oneshot`` with every expert calibrated and
  counts the tokens each expert Linear saw while LLM Compressor's calibration
  hooks were live; ``Coverage`` fails if one saw fewer tokens than its block, or
  lacks a quantization parameter, or has one that is NaN/inf.
- ``save_pretrained`` compresses, builds the exact state dict transformers will
  write, gives unpacked views their own storage, checks the layout
  (``check_state_dict``) *before* anything is written, saves, then reloads the
  safetensors files and compares every tensor bitwise.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from transformers.core_model_loading import WeightRenaming

from .. import errors
from ..registry import MoECalibrationModule

__all__ = [
    "AutocalExpertRenaming",
    "CheckpointLayout",
    "CheckpointLayoutError",
    "Coverage",
    "CoverageError",
    "CoverageTracker",
    "ExpertLinear",
    "LinearCoverage",
    "LinearizationConflict",
    "Preparation",
    "SavedCheckpoint",
    "calibration_blocks",
    "check_coverage",
    "check_linearization",
    "check_state_dict",
    "checkpoint_layout",
    "checkpoint_names",
    "coverage",
    "default_ignore",
    "expert_linears",
    "gate_modules",
    "install_checkpoint_names",
    "llmcompressor_moe_targets",
    "load_saved_state_dict",
    "oneshot",
    "prepare",
    "save_pretrained",
    "saved_names",
    "set_calibration",
    "shared_storage_groups",
    "unshare",
    "verify_saved",
]

SAFETENSORS_GLOB = "*.safetensors"


def _listing(what: str, problems: list[str]) -> str:
    shown = "\n  - ".join(problems[:20])
    more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{len(problems)} {what} problem(s):\n  - {shown}{more}"


class LinearizationConflict(errors.AutocalError, RuntimeError):
    """LLM Compressor would linearize (replace) modules inside a block autocal converted."""

    def __init__(self, message: str) -> None:
        super().__init__(errors.LINEARIZATION_CONFLICT, message)


class CheckpointLayoutError(errors.AutocalError, ValueError):
    """A state dict does not have the per-expert layout vLLM and transformers expect; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(errors.CHECKPOINT_LAYOUT, _listing("checkpoint layout", problems))


class CoverageError(errors.AutocalError, AssertionError):
    """An expert Linear was not fully calibrated."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(errors.CALIBRATION_COVERAGE, _listing("coverage", problems))


# --------------------------------------------------------------------------------------------------
# What autocal converted
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLinear:
    """One ``nn.Linear`` of one expert: ``{block}.{container}.{expert}.{name}``."""

    path: str
    block: str
    container: str
    expert: int
    name: str


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

    Experts come from ``module.expert_modules()``; their path is found by
    identity in the block, so hand-written overrides work too.
    """
    result: list[ExpertLinear] = []
    for block_path, block in calibration_blocks(model):
        if not hasattr(block, "expert_modules"):
            continue
        names = {id(m): n for n, m in block.named_modules()}
        for index, expert in enumerate(block.expert_modules()):
            expert_path = names.get(id(expert))
            if expert_path is None:
                continue
            container, _, _ = expert_path.rpartition(".")
            for name, sub in expert.named_modules():
                if isinstance(sub, nn.Linear):
                    result.append(ExpertLinear(_join(block_path, expert_path, name), block_path, container, index,
                                               name))
    return result


def gate_modules(model: nn.Module) -> list[str]:
    """Module paths of the gates autocal detected: each block's router (and Linears inside it),
    and bare ``nn.Linear`` shared modules of a block (a shared expert's scalar gate, as in Qwen2-MoE).

    Read from each calibration module's detected structure, never from a list of names.
    Blocks converted by a hand-written override carry no structure and contribute nothing.
    """
    gates: list[str] = []
    for block_path, block in calibration_blocks(model):
        structure = getattr(block, "structure", None)
        if structure is None:
            continue
        router_path = structure.router.module_path
        if router_path:
            router = block.get_submodule(router_path)
            gates.append(_join(block_path, router_path))
            gates += [_join(block_path, router_path, n) for n, m in router.named_modules()
                      if n and isinstance(m, nn.Linear)]
        for shared in structure.shared_modules:
            module = block.get_submodule(shared)
            if isinstance(module, nn.Linear) and not list(module.children()):
                gates.append(_join(block_path, shared))
    return list(dict.fromkeys(gates))


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


# --------------------------------------------------------------------------------------------------
# prepare: convert, keep LLM Compressor's linearization away, name checkpoint keys
# --------------------------------------------------------------------------------------------------


def llmcompressor_moe_targets(model: nn.Module) -> list[str]:
    """Modules ``llmcompressor.oneshot`` would linearize (replace) in ``model``, as 0.14.0.1 decides it:
    ``get_non_linearized_moes`` (packed containers of ``@use_experts_implementation`` classes, and
    classes registered with ``LinearExperts2D``). Empty when llmcompressor is not installed."""
    try:
        from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    except ImportError:
        return []
    return [name for name, _ in get_non_linearized_moes(model)]


def check_linearization(model: nn.Module) -> list[str]:
    """Raise ``LinearizationConflict`` if LLM Compressor would replace a module inside a converted block.

    Returns the modules LLM Compressor will linearize outside converted blocks (blocks
    autocal did not convert; ``oneshot`` linearizes and calibrates those itself).
    """
    blocks = [p for p, _ in calibration_blocks(model)]
    targets = llmcompressor_moe_targets(model)
    inside = [t for t in targets if any(t == b or t.startswith(b + ".") or not b for b in blocks)]
    if inside:
        raise LinearizationConflict(
            f"llmcompressor.oneshot would linearize {inside[:5]} inside blocks autocal converted; "
            "the converted block no longer computes the original's output if its experts are replaced. "
            "This means a converted block still holds a packed experts container: report it to autocal.")
    return targets


def _base_conversions(model: nn.Module, *, with_autocal: bool = True) -> list:
    """The conversions transformers reverts on save, as ``revert_weight_conversion`` picks them
    (``with_autocal=False``: without the renamings ``install_checkpoint_names`` added)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    return [c for c in conversions if with_autocal or not getattr(c, "_autocal", False)]


def _revert(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` as transformers' ``save_pretrained`` would name (and convert) it."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state_dict))


def _packed_state(block: MoECalibrationModule, block_path: str) -> dict[str, torch.Tensor]:
    """The parameters of the block's original experts container, under their model paths."""
    structure = getattr(block, "structure", None)
    if structure is None:
        return {}
    try:
        original = block.restore()
    except Exception:
        return {}
    if original is None:
        return {}
    container = original.get_submodule(structure.experts.module_path)
    return {_join(block_path, structure.experts.module_path, name): param
            for name, param in container.named_parameters(recurse=False)}


def saved_names(model: nn.Module, keys: Iterable[str], *, with_autocal: bool = True) -> dict[str, str]:
    """Each in-model key as transformers' ``save_pretrained`` will name it (its save-time renamings).

    Mirrors ``transformers.core_model_loading.revert_weight_conversion`` (5.17) key by key,
    for keys that no weight converter merges (per-expert keys, quantization parameters).
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = _base_conversions(model, with_autocal=with_autocal)
    if not conversions:
        return {k: k for k in keys}
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    return {k: rename_source_key(k, renamings, converters, reverse=True)[0] for k in keys}


def checkpoint_names(model: nn.Module) -> dict[str, dict[str, str]]:
    """How the model's original checkpoint names each expert Linear, per experts container leaf name.

    Derived from transformers' conversion mapping for the model (the one it uses to
    load and save): the original packed parameters of the first block of each class
    are reverted to checkpoint format, and each unpacked Linear is matched to the
    reverted tensor it equals. Returns ``{container_leaf: {linear_name: checkpoint_name}}``
    with only the names that differ (Mixtral: ``{"experts": {"gate_proj": "w1", "up_proj": "w3",
    "down_proj": "w2"}}``); containers whose checkpoint stores packed tensors keep autocal's names.
    """
    names: dict[str, dict[str, str]] = {}
    seen_classes: set[type] = set()
    by_block: dict[str, list[ExpertLinear]] = {}
    for linear in expert_linears(model):
        by_block.setdefault(linear.block, []).append(linear)
    for block_path, block in calibration_blocks(model):
        if type(block) in seen_classes or block_path not in by_block:
            continue
        seen_classes.add(type(block))
        packed = _packed_state(block, block_path)
        if not packed:
            continue
        mapping = _match_names(model, by_block[block_path], _revert(model, packed))
        if not mapping:
            continue  # the checkpoint stores these experts packed, or no unique match: autocal's names
        leaf = by_block[block_path][0].container.rpartition(".")[2]
        previous = names.setdefault(leaf, {})
        for ours, theirs in mapping.items():
            if previous.get(ours, theirs) != theirs:
                warnings.warn(f"autocal: experts containers named {leaf!r} map {ours!r} to both "
                              f"{previous[ours]!r} and {theirs!r}; keeping {previous[ours]!r}", stacklevel=2)
                continue
            previous[ours] = theirs
    return {leaf: {k: v for k, v in m.items() if k != v} for leaf, m in names.items()
            if any(k != v for k, v in m.items())}


def _match_names(model: nn.Module, linears: list[ExpertLinear], reverted: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{linear_name: checkpoint_name}`` from matching every expert's Linear weight to a reverted tensor."""
    plain = saved_names(model, [_join(lin.path, "weight") for lin in linears], with_autocal=False)
    mapping: dict[str, str] = {}
    for linear in linears:
        weight = model.get_submodule(linear.path).weight
        plain_key = plain[_join(linear.path, "weight")]
        prefix = plain_key[: -len(f"{linear.expert}.{linear.name}.weight")]
        candidates = [k for k, t in reverted.items()
                      if k.startswith(f"{prefix}{linear.expert}.") and k.endswith(".weight")
                      and t.shape == weight.shape and torch.equal(t, weight)]
        if len(candidates) != 1:
            return {}  # absent (packed checkpoint) or ambiguous: keep autocal's names
        theirs = candidates[0][len(f"{prefix}{linear.expert}."): -len(".weight")]
        if mapping.setdefault(linear.name, theirs) != theirs:
            return {}
    return mapping


class AutocalExpertRenaming(WeightRenaming):
    """A transformers ``WeightRenaming`` that autocal added (its reverse is one too)."""

    _autocal = True


def _renamings(names: dict[str, dict[str, str]]) -> list:
    """transformers ``WeightRenaming``s (checkpoint name → model name) for ``checkpoint_names``' output."""
    renaming = AutocalExpertRenaming
    renamings = []
    for leaf, mapping in names.items():
        for ours, theirs in mapping.items():
            renamings.append(renaming(source_patterns=rf"\.{re.escape(leaf)}\.(\d+)\.{re.escape(theirs)}\.",
                                      target_patterns=rf".{leaf}.\1.{ours}."))
    return renamings


_RENAMINGS_ATTR = "_autocal_checkpoint_renamings"


def install_checkpoint_names(model: nn.Module) -> dict[str, dict[str, str]]:
    """Make ``save_pretrained`` write expert keys under the original checkpoint's names.

    Appends ``WeightRenaming``s to ``model._weight_conversions`` (what transformers
    reverts on save, and what compressed-tensors uses to name the ``ignore`` list).
    Idempotent.
    """
    names = checkpoint_names(model)
    if getattr(model, _RENAMINGS_ATTR, None) == names:
        return names
    conversions = _base_conversions(model, with_autocal=False)
    model._weight_conversions = conversions + _renamings(names)
    setattr(model, _RENAMINGS_ATTR, names)
    return names


@dataclass
class Preparation:
    """What ``prepare`` did."""

    blocks: list[str]
    expert_linears: int
    gates: list[str]
    checkpoint_names: dict[str, dict[str, str]]
    linearized_by_llmcompressor: list[str]

    def __str__(self) -> str:
        shown = ", ".join(self.gates[:2]) + (", …" if len(self.gates) > 2 else "")
        lines = [f"autocal: {len(self.blocks)} MoE block(s) converted, {self.expert_linears} expert Linears",
                 f"  gates kept out of quantization: {len(self.gates)} ({shown})"]
        for leaf, mapping in self.checkpoint_names.items():
            lines.append(f"  checkpoint names under '{leaf}': " + ", ".join(f"{a}→{b}" for a, b in mapping.items()))
        if self.linearized_by_llmcompressor:
            lines.append(f"  left to LLM Compressor's linearization: {self.linearized_by_llmcompressor}")
        return "\n".join(lines)


def prepare(model: nn.Module, *, example_inputs: dict | None = None, forward: Any = None, verify: bool = True,
            checkpoint_naming: bool = True, calibration_chunk_size: int | None = None,
            strict: bool = False) -> Preparation:
    """Convert ``model`` for ``oneshot``: autocal calibration modules, no LLM Compressor linearization inside them,
    expert keys saved under the original checkpoint's names.

    Calibration modules are left with ``calibrate_all_experts=True``, so a plain
    ``llmcompressor.oneshot`` call calibrates every expert too; ``oneshot`` below
    turns it off when it ends. ``calibration_chunk_size`` bounds calibration's
    activation memory (``autocal.set_calibration_chunk_size``). MoE blocks autocal cannot convert are left
    to LLM Compressor's own linearization (``strict=False``), with a warning naming them; ``strict=True``
    raises instead.
    """
    from .. import api

    api.convert(model, calibrate_all_experts=True, verify=verify, example_inputs=example_inputs, forward=forward,
                calibration_chunk_size=calibration_chunk_size, strict=strict)
    left = api.unconverted(model)
    if left:
        warnings.warn(f"autocal: LLM Compressor's own MoE linearization handles the {len(left)} block(s) autocal "
                      f"left unconverted: {', '.join(u.path or '<model>' for u in left)}", stacklevel=2)
    linearized = check_linearization(model)
    names = install_checkpoint_names(model) if checkpoint_naming else {}
    return Preparation([p for p, _ in calibration_blocks(model)], len(expert_linears(model)), gate_modules(model),
                       names, linearized)


# --------------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------------


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
        for linear in expert_linears(self.model):
            self.linear_tokens.setdefault(linear.path, 0)
            module = self.model.get_submodule(linear.path)
            self._handles.append(module.register_forward_pre_hook(self._counter(self.linear_tokens, linear.path),
                                                                  with_kwargs=True))
        return self

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
    result = []
    tracked = tracker is not None and any(tracker.block_tokens.values())  # data-free recipes run no forward
    quantized = any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())
    for linear in expert_linears(model):
        module = model.get_submodule(linear.path)
        scheme = getattr(module, "quantization_scheme", None)
        tensors = {name: t for name, t in list(module.named_parameters(recurse=False))
                   + list(module.named_buffers(recurse=False)) if name.endswith(QPARAM_SUFFIXES)}
        required = _required_qparams(scheme) if scheme is not None else []
        entry = LinearCoverage(
            path=linear.path, block=linear.block, expert=linear.expert, name=linear.name,
            tokens=tracker.linear_tokens.get(linear.path) if tracked else None,
            block_tokens=tracker.block_tokens.get(linear.block) if tracked else None,
            scheme=scheme is not None if quantized else None,
            qparams={n: tuple(t.shape) for n, t in tensors.items()},
            missing=[n for n in required if n not in tensors],
        )
        for name, tensor in tensors.items():
            values = tensor.detach()
            if values.is_floating_point() and values.dtype.itemsize == 1:
                values = values.float()
            if values.is_floating_point() and not torch.isfinite(values).all():
                entry.nonfinite.append(name)
            elif name.endswith("scale") and values.numel() and (values == 0).any():
                entry.zero.append(name)
        result.append(entry)
    return Coverage(result, dict(tracker.block_tokens) if tracker else {}, require_all_tokens)


def check_coverage(model: nn.Module, tracker: CoverageTracker | None = None) -> Coverage:
    """``coverage(model, tracker).check()``."""
    return coverage(model, tracker).check()


# --------------------------------------------------------------------------------------------------
# oneshot
# --------------------------------------------------------------------------------------------------


def _with_ignore(recipe: Any, extra: list[str]) -> Any:
    """Copies of the recipe's modifiers with ``extra`` added to every ``ignore`` list."""
    if not extra:
        return recipe
    if isinstance(recipe, (list, tuple)):
        return type(recipe)(_with_ignore(r, extra) for r in recipe)
    ignore = getattr(recipe, "ignore", None)
    if isinstance(ignore, list) and hasattr(recipe, "model_copy"):
        merged = ignore + [name for name in extra if name not in ignore]
        return recipe.model_copy(update={"ignore": merged})
    if isinstance(recipe, (str, Path)) or recipe is None:
        warnings.warn("autocal: the recipe is not a modifier object; add autocal_lc.default_ignore(model) to its "
                      "ignore lists yourself to keep routers out of quantization", stacklevel=3)
    return recipe


def set_calibration(model: nn.Module, enabled: bool) -> None:
    """Set ``calibrate_all_experts`` on every calibration module."""
    for _, block in calibration_blocks(model):
        block.calibrate_all_experts = enabled


@contextmanager
def _calibrating(model: nn.Module, enabled: bool, propagate_routed: bool = False) -> Iterator[None]:
    """Within, calibration modules run every expert on every token (``enabled``).

    With ``propagate_routed``, only while some LLM Compressor hook could see it: in a pass with all
    its hooks disabled (the sequential pipeline's propagation pass, whose output only feeds the next
    layer) the experts run on their routed tokens, as the original runs them. The output is the same
    within rounding (calibration discards what unrouted tokens give), for E/k times less expert work.
    """
    set_calibration(model, enabled)
    handles = []
    if enabled and propagate_routed:
        def follow_hooks(block: nn.Module, args: Any) -> None:
            observed = _lc_hooks_live(or_kept=True)
            if block.calibrate_all_experts != observed:
                block.calibrate_all_experts = observed
        handles = [block.register_forward_pre_hook(follow_hooks) for _, block in calibration_blocks(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        set_calibration(model, False)


def _check_name_or_path(model: nn.Module) -> None:
    """llmcompressor 0.14 re-reads the model's config from ``config.name_or_path`` (``Oneshot.validate_model``)."""
    config = getattr(model, "config", None)
    source = getattr(config, "name_or_path", None) if config is not None else None
    if config is not None and not source:
        raise ValueError(
            "llmcompressor.oneshot reads the model's config again from model.config.name_or_path, which is empty: "
            "load the model with from_pretrained (a local directory or a cached hub id), or save it and "
            "set model.config.name_or_path to that directory")


def oneshot(model: nn.Module, *, recipe: Any, calibrate_all_experts: bool = True, quantize_gates: bool = False,
            check: bool = True, require_all_tokens: bool = True, output_dir: str | None = None,
            save_compressed: bool = True, propagate_routed: bool = True, **oneshot_kwargs: Any) -> Coverage:
    """``llmcompressor.oneshot`` on an autocal-converted model; returns the per-expert ``Coverage``.

    Converts first (``prepare``) if the model has no calibration module. Every
    quantization modifier's ``ignore`` gets the detected gates unless
    ``quantize_gates``. During the call every calibration module runs every token
    through every expert (``calibrate_all_experts``, also passed on as
    ``moe_calibrate_all_experts`` for blocks LLM Compressor linearizes itself)
    whenever a hook of LLM Compressor's could see it; afterwards calibration is
    off, so the model runs as the original would.

    Args:
        model: a transformers model (``from_pretrained``).
        recipe: LLM Compressor modifiers (or a recipe LLM Compressor accepts).
        check: raise ``CoverageError`` if an expert Linear missed tokens or quantization parameters.
        require_all_tokens: count it a problem when an expert Linear saw fewer tokens than its block
            (with ``calibrate_all_experts=False`` experts see only their routed tokens).
        output_dir: if given, save with ``save_pretrained`` below (checked) rather than LLM Compressor's save.
        propagate_routed: in passes with every LLM Compressor hook disabled (the sequential pipeline's
            propagation passes, which only carry a layer's output to the next), run the experts on their
            routed tokens alone: the same output within rounding, for about half of ``oneshot``'s expert
            work. ``False`` runs every expert there too, as LLM Compressor's own path does, which
            reproduces that path's results to rounding.
        **oneshot_kwargs: passed to ``llmcompressor.oneshot`` (dataset, processor, num_calibration_samples, …).
    """
    import llmcompressor

    _check_name_or_path(model)
    if not calibration_blocks(model):
        prepare(model)
    check_linearization(model)
    if not hasattr(model, _RENAMINGS_ATTR):  # converted with autocal.convert rather than prepare
        install_checkpoint_names(model)
    if not quantize_gates:
        recipe = _with_ignore(recipe, gate_modules(model))
    oneshot_kwargs.setdefault("moe_calibrate_all_experts", calibrate_all_experts)
    with ExitStack() as stack:
        stack.enter_context(_calibrating(model, calibrate_all_experts, propagate_routed))
        tracker = stack.enter_context(CoverageTracker(model))
        llmcompressor.oneshot(model=model, recipe=recipe, **oneshot_kwargs)
    report = coverage(model, tracker, require_all_tokens=require_all_tokens)
    if check:
        report.check()
    if output_dir is not None:
        save_pretrained(model, output_dir, save_compressed=save_compressed)
    return report


# --------------------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointLayout:
    """The keys a saved state dict must hold for the converted experts.

    ``experts``: saved key prefix of every expert Linear (``…experts.{i}.w1``), to the in-model path.
    ``containers``: saved prefix of each experts container, to the number of experts and the names
    its children may use; ``members``: other keys allowed under a container (its own shared tensors).
    ``tied``: pairs of keys transformers declares tied (allowed to share storage).
    """

    experts: dict[str, str]
    containers: dict[str, tuple[int, frozenset[str]]]
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    tied: frozenset[frozenset[str]] = frozenset()


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """The layout ``save_pretrained`` must produce for ``model`` (uses its save-time conversions)."""
    linears = expert_linears(model)
    saved = saved_names(model, [_join(lin.path, "weight") for lin in linears])
    experts: dict[str, str] = {}
    containers: dict[str, tuple[int, set[str]]] = {}
    counts: dict[str, int] = {}
    for linear in linears:
        key = _join(linear.block, linear.container)
        counts[key] = max(counts.get(key, 0), linear.expert + 1)
    members: dict[str, frozenset[str]] = {}
    for linear in linears:
        prefix = saved[_join(linear.path, "weight")][: -len(".weight")]
        experts[prefix] = linear.path
        container_key, _, rest = prefix.rpartition(f".{linear.expert}.")
        num, names = containers.setdefault(container_key, (counts[_join(linear.block, linear.container)], set()))
        names.add(rest)
        if container_key not in members:
            container = model.get_submodule(_join(linear.block, linear.container))
            expert_children = {str(i) for i in range(num)}
            own = {n for n, _ in container.named_parameters() if n.split(".", 1)[0] not in expert_children}
            own |= {n for n, _ in container.named_buffers() if n.split(".", 1)[0] not in expert_children}
            members[container_key] = frozenset(own)
    tied = frozenset(frozenset((a, b)) for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items())
    return CheckpointLayout(experts, {k: (n, frozenset(v)) for k, (n, v) in containers.items()}, members, tied)


def shared_storage_groups(state_dict: Mapping[str, torch.Tensor],
                          allowed: Iterable[frozenset[str]] = ()) -> list[list[str]]:
    """Groups of keys whose tensors share storage (views of one buffer), except ``allowed`` pairs."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(key)
    allowed = set(allowed)
    return [sorted(keys) for keys in groups.values()
            if len(keys) > 1 and not (len(keys) == 2 and frozenset(keys) in allowed)]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], layout: CheckpointLayout) -> None:
    """Raise ``CheckpointLayoutError`` unless ``state_dict`` (as it will be written) is per-expert and unshared.

    - every expert Linear has a weight under its saved prefix (``P.weight`` or ``P.weight_packed``);
    - under an experts container, only ``{i}.{name}.…`` keys with ``i`` < number of experts and
      ``name`` one of the expected Linear names (or the container's own tensors): no packed tensor;
    - no two tensors share storage (safetensors and transformers mishandle them), tied weights aside.
    """
    problems: list[str] = []
    keys = set(state_dict)
    for prefix, path in layout.experts.items():
        if not any(f"{prefix}.{w}" in keys for w in ("weight", "weight_packed")):
            problems.append(f"no weight for expert Linear {path} (expected {prefix}.weight or {prefix}.weight_packed)")
    under: dict[str, list[str]] = {}
    for key in sorted(keys):  # keys grouped by the experts container above them, in one pass
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix in layout.containers:
                under.setdefault(prefix, []).append(key)
    for container, (num, names) in layout.containers.items():
        start = container + "."
        for key in under.get(container, []):
            rest = key[len(start):]
            head, _, tail = rest.partition(".")
            if head.isdigit():
                name = next((n for n in names if tail.startswith(n + ".")), None)
                if int(head) >= num:
                    problems.append(f"{key}: expert index {head} >= {num} experts")
                elif name is None:
                    problems.append(f"{key}: not one of the expert Linears {sorted(names)}")
            elif rest not in layout.members.get(container, ()):
                problems.append(f"{key}: packed or unknown tensor under experts container {container}")
    for group in shared_storage_groups(state_dict, layout.tied):
        problems.append(f"tensors share storage: {group[:4]}{' …' if len(group) > 4 else ''}")
    if problems:
        raise CheckpointLayoutError(problems)


def unshare(state_dict: dict[str, torch.Tensor], allowed: Iterable[frozenset[str]] = ()) -> dict[str, torch.Tensor]:
    """Give every tensor that shares storage with another its own contiguous copy (in a new dict)."""
    out = dict(state_dict)
    for group in shared_storage_groups(out, allowed):
        for key in group:
            out[key] = out[key].detach().clone(memory_format=torch.contiguous_format)
    return out


def _state_dict_to_write(model: nn.Module, layout: CheckpointLayout) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, torch.Tensor]]:
    """(the state dict to hand ``save_pretrained``, the one it will write), mirroring transformers 5.17."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v.detach() for k, v in model.state_dict().items()}
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = unshare(state, layout.tied)
    to_write = remove_tied_weights_from_state_dict(dict(state), model)
    return state, _revert(model, to_write)


def load_saved_state_dict(save_directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``save_directory``."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(save_directory).glob(SAFETENSORS_GLOB)):
        state.update(load_file(str(path)))
    return state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def verify_saved(save_directory: str | Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Raise ``CheckpointLayoutError`` unless the saved tensors are exactly ``expected`` (keys, dtypes, bytes)."""
    saved = load_saved_state_dict(save_directory)
    problems = [f"missing after reload: {k}" for k in sorted(set(expected) - set(saved))]
    problems += [f"unexpected after reload: {k}" for k in sorted(set(saved) - set(expected))]
    problems += [f"differs after reload: {k}" for k in sorted(set(saved) & set(expected))
                 if not _same(saved[k], expected[k].cpu())]
    if problems:
        raise CheckpointLayoutError(problems)


@dataclass
class SavedCheckpoint:
    """What ``save_pretrained`` wrote."""

    path: Path
    keys: list[str]
    expert_keys: int
    quantization_config: dict | None


def save_pretrained(model: nn.Module, save_directory: str | Path, *, save_compressed: bool = True,
                    verify: bool = True, **kwargs: Any) -> SavedCheckpoint:
    """Save like LLM Compressor does (compressed-tensors format), checked before and verified after writing.

    1. compress in memory (``ModelCompressor.compress_model``), as LLM Compressor's save does;
    2. build the state dict transformers will write (tied weights dropped, conversions reverted),
       with unpacked views given their own storage;
    3. ``check_state_dict`` against ``checkpoint_layout(model)``: on failure nothing is written;
    4. ``model.save_pretrained`` (LLM Compressor's wrapper: config, recipe, quantization config);
    5. with ``verify``, reload every safetensors file and compare each tensor bitwise.

    Without the extra installed, steps 1 and 4 are transformers' own dense save.
    """
    if not calibration_blocks(model):
        raise errors.AutocalError(errors.BAD_INPUT, "the model holds no autocal calibration module: "
                                  "autocal_lc.save_pretrained saves a model autocal_lc.prepare converted; nothing "
                                  "was written", block_class=type(model).__name__,
                                  hints=["call autocal_lc.prepare(model) first (autocal_lc.oneshot calls it), then "
                                         "oneshot, then save"])
    try:
        from compressed_tensors import ModelCompressor
        from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    except ImportError:  # without the extra: transformers' own save, dense (nothing was quantized)
        ModelCompressor = modify_save_pretrained = None
    if modify_save_pretrained is not None:
        modify_save_pretrained(model)
        kwargs["save_compressed"] = save_compressed
    if save_compressed and ModelCompressor is not None:
        compressor = ModelCompressor.from_pretrained_model(model)
        if compressor is not None:
            compressor.compress_model(model, skip_compressed=True)
    layout = checkpoint_layout(model)
    state, to_write = _state_dict_to_write(model, layout)
    check_state_dict(to_write, layout)
    save_directory = Path(save_directory)
    model.save_pretrained(str(save_directory), state_dict=state, **kwargs)
    if verify:
        verify_saved(save_directory, to_write)
    config_file = save_directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    expert_keys = sum(1 for k in to_write if k.rsplit(".", 1)[0] in layout.experts)
    return SavedCheckpoint(save_directory, sorted(to_write), expert_keys, config.get("quantization_config"))
