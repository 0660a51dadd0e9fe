"""Public entry points: ``synthesize``, ``convert``, ``calibration_context``.

Blocks of one class are analysed once; the generated calibration class is
reused for every block of that class, and the first block of each class is
verified against the original before anything is swapped.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import errors
from .coverage import count_tokens
from .detect.detector import unrecognized_experts
from .detect.plans import Plan
from .detect.structure import MoEStructure
from .registry import MoECalibrationModule
from .rules import Decision, decide, enclosed, find_moe_blocks, innermost_first, user_line
from .synthesize.experts import CalibrationExperts
from .synthesize.module import checked_chunk_size
from .trace.inputs import BlockCall, block_call
from .trace.calls import locate_blocks, unreached
from .trace.twin import on_meta
from .unconverted import UNCONVERTED, Unconverted, unconverted, unrecognized, within
from .verify import Verification, counts_itself, verification_cases, verify

__all__ = ["synthesize", "convert", "calibration_context", "set_calibration_chunk_size", "Converter", "unconverted"]


@dataclass
class ClassAnalysis:
    """What one block class turned into: the plan of the rule that matched, and its module class."""

    calibration_cls: type[MoECalibrationModule]
    plan: Plan
    verification: Verification | None = None

    @property
    def structure(self) -> MoEStructure | None:
        return self.plan.structure


def analysis_key(block: nn.Module) -> tuple:
    """Blocks analysed once together: same class, same classes of children.

    One class can hold different routers per layer (DeepSeek-V4: hash routing
    in early layers, top-k later), so the children's classes are part of the key.
    """
    return (type(block), tuple((name, type(child)) for name, child in block.named_children()))


@dataclass
class Converter:
    """Analyses block classes once and builds calibration modules for their blocks."""

    calibrate_all_experts: bool = True
    verify: bool = True
    compare_eager: bool = False  # verification also runs transformers' eager experts (``explain`` reports it)
    classes: dict[tuple, ClassAnalysis] = field(default_factory=dict)
    decisions: dict[tuple, Decision] = field(default_factory=dict)  # every rule's verdict, per class
    not_moe: set[tuple] = field(default_factory=set)  # candidate classes the rules ruled out

    def not_moe_reason(self, block: nn.Module) -> str:
        """Why the rules ruled ``block``'s class out as an MoE (after ``analyse`` raised ``NotAnMoE`` for it)."""
        decision = self.decisions[analysis_key(block)]
        return next(v.reason for v in decision.verdicts if getattr(v.result, "not_moe", False))

    def analyse(self, block: nn.Module, call: BlockCall | None = None, twin: nn.Module | None = None) -> ClassAnalysis:
        """Analyse ``block``'s class once (on ``twin``, a runnable copy, when ``block`` is on the meta device)."""
        cls = analysis_key(block)
        if cls in self.not_moe:
            raise errors.NotAnMoE(type(block).__name__)
        if cls not in self.classes:
            decision = self.decisions[cls] = decide(twin if twin is not None else block, call)
            if decision.plan is None:
                if decision.not_moe:
                    self.not_moe.add(cls)
                    raise errors.NotAnMoE(type(block).__name__)
                raise decision.error(block)
            try:
                built = decision.rule.build(decision.plan, block)
            except errors.AutocalError:
                raise
            except Exception as error:  # a plan its builder cannot follow: an error a user can act on
                raise errors.AutocalError(
                    errors.UNSUPPORTED_DISPATCH, f"rule {decision.rule.name} matched, but building its calibration "
                    f"module failed: {type(error).__name__}: {error}", block_class=type(block).__name__,
                    source=user_line(error)) from error
            self.classes[cls] = ClassAnalysis(built, decision.plan)
        return self.classes[cls]

    def build(self, block: nn.Module, config: Any = None, call: BlockCall | None = None,
              twin: nn.Module | None = None) -> MoECalibrationModule:
        with _state_kept(block):  # detection and verification run the block many times
            module = self._verified(block, config, call, twin)
        hook = not counts_itself(module)
        for expert in getattr(module, "expert_modules", list)():
            count_tokens(expert, hook=hook)  # after verification: coverage counts the user's tokens
        return module

    def _verified(self, block: nn.Module, config: Any, call: BlockCall | None,
                  twin: nn.Module | None) -> MoECalibrationModule:
        analysis = self.analyse(block, call, twin)
        module = analysis.calibration_cls(block, config, calibrate_all_experts=self.calibrate_all_experts)
        module.__dict__.setdefault("_original", block)  # what restore() puts back, for overrides too
        if self.verify and analysis.verification is None and not on_meta(block):
            structure = analysis.structure
            cases = verification_cases(block, call, structure.experts.module_path if structure is not None else None)
            for index, case in enumerate(cases):
                verified = verify(block, module, case.args, case.kwargs, expected=case.expected,
                                  eager=self.compare_eager and index == 0)
                if index == 0:  # the first case (the caller's inputs, where given): what explain reports
                    analysis.verification = verified
        return module


_MODULE_STATE = frozenset(nn.Module().__dict__)  # what nn.Module keeps in an instance's __dict__ itself


@contextmanager
def _state_kept(block: nn.Module) -> Iterator[None]:
    """Within, the forward may change what the block's modules keep besides their parameters, buffers and
    children; after, each attribute they had holds what it held before, and a list, dict or set the same items
    (a forward that appends its aux loss to a list, counts its calls or keeps its last routing)."""
    saved = [(module.__dict__, key, value, copy.copy(value) if isinstance(value, (list, dict, set)) else None)
             for module in block.modules() for key, value in module.__dict__.items() if key not in _MODULE_STATE]
    try:
        yield
    finally:
        for attributes, key, value, items in saved:
            attributes[key] = value
            if isinstance(value, list):
                value[:] = items
            elif isinstance(value, (dict, set)):
                value.clear()
                value.update(items)


def synthesize(block: nn.Module, config: Any = None, calibrate_all_experts: bool = True, *,
               verify: bool = True, example_inputs: dict | None = None) -> MoECalibrationModule:
    """A calibration module for one MoE block.

    Args:
        block: the MoE block (e.g. a ``Qwen3MoeSparseMoeBlock``).
        config: passed to a registered override; synthesis does not need it.
        calibrate_all_experts: send every token through every expert.
        verify: check the result against ``block`` before returning it.
        example_inputs: the block's forward inputs by parameter name, for a block
            whose forward needs more than hidden states that autocal could make up
            (``token_type_ids`` choosing an expert set, say); detection and
            verification then run on them. Default: hidden states made from the
            block's parameters.

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block
        >>> module = synthesize(make_toy_block(ToyMoEConfig()))
        >>> module.experts[0].gate_proj
        Linear(in_features=16, out_features=24, bias=False)
    """
    call = block_call(block, example_inputs) if example_inputs is not None else None
    converter = Converter(calibrate_all_experts, verify)
    try:
        return converter.build(block, config, call)
    except errors.NotAnMoE as error:  # a block given by name is an error, not a skip
        reason = converter.not_moe_reason(block)
        raise errors.AutocalError(errors.NO_MOE_BLOCK, f"the rules show the module is no MoE block: {reason}",
                                  block_class=type(block).__name__) from error


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    model.get_submodule(parent).add_module(name, module) if parent else model.add_module(name, module)


def convert(model: nn.Module, calibrate_all_experts: bool = True, verify: bool = True, *,
            example_inputs: dict | None = None, forward: Any = None,
            converter: Converter | None = None, calibration_chunk_size: int | None = None,
            strict: bool = True, group_experts: bool = True) -> nn.Module:
    """Swap every MoE block of ``model`` for its calibration module, in place.

    Detection and verification run each block several times; what a block's forward keeps on its modules (an
    aux-loss list it appends to, a call counter) is left as it was before.

    Args:
        model: any model; blocks are found by what they hold and do.
        calibrate_all_experts: initial calibration mode of the new modules.
        verify: check the first block of each class against the original.
        example_inputs: model keyword inputs; when given, blocks are analysed on
            the inputs the model really passes them (needed for blocks with
            inputs beyond hidden states). Blocks the example does not reach get
            inputs made from their parameters. For a model on the meta device the
            example runs through a CPU twin with random weights.
        forward: what to call with ``example_inputs`` (default: ``model``), for
            composite models whose forward lives in a sub-model.
        calibration_chunk_size: see ``set_calibration_chunk_size``.
        strict: raise if any module that routes among experts would be left unconverted (a block
            no rule converts, or experts no recognised block holds). With ``strict=False`` such
            blocks are left as they are, named in a warning and listed by ``unconverted(model)``.
        group_experts: with calibration on, run the experts unpacked from a packed container several at
            a time where nothing needs each expert module called (no hook on it; ``synthesize/grouped.py``).
            ``False`` calls each expert module on its own: the same outputs and statistics, slower; for
            comparing the two (``benchmarks/oneshot.py``).

    Returns:
        ``model``, converted. Raises ``AutocalError`` if a block cannot be converted (``strict``).

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block
        >>> model = torch.nn.Sequential(make_toy_block(ToyMoEConfig()))
        >>> type(convert(model)[0]).__name__
        'CalibrationToyConcatMoeBlock'
    """
    converter = converter or Converter(calibrate_all_experts, verify)
    blocks = [(p, b) for p, b in find_moe_blocks(model) if not isinstance(b, MoECalibrationModule)]
    converted = [p for p, m in model.named_modules() if isinstance(m, MoECalibrationModule)]
    skipped = unrecognized(model, unrecognized_experts(model, [p for p, _ in blocks] + converted), strict)
    blocks = [(p, b) for p, b in blocks if not any(within(p, s.path) for s in skipped)]
    blocks, calls, twin = locate_blocks(model, blocks, example_inputs, forward)
    config = getattr(model, "config", None)
    built: dict[int, MoECalibrationModule] = {}  # a block reached by two paths stays one (tied) module
    ruled_out: list[str] = []  # candidates the rules show are no MoE, with the reason
    done: list[str] = []  # paths converted
    failed: dict[str, tuple[Unconverted, errors.AutocalError]] = {}
    paths = [p for p, _ in blocks]
    for path, block in _progress(innermost_first(blocks)):
        if any(enclosed(d, path) for d in done):
            continue  # a candidate around a block converted: a second block over the same experts
        if id(block) not in built:
            try:
                built[id(block)] = converter.build(block, config, calls.get(path),
                                                   twin.get_submodule(path) if twin else None)
            except errors.NotAnMoE:
                built[id(block)] = None
                ruled_out.append(f"{type(block).__name__} at `{path or '<root>'}`: {converter.not_moe_reason(block)}")
            except errors.AutocalError as error:
                error = unreached(error, example_inputs, calls, path).with_context(
                    module_path=path, block_class=type(block).__name__)
                around = any(enclosed(path, p) for p in paths)  # a candidate around it may convert instead
                if (strict and not around) or error.kind in (errors.BAD_INPUT, errors.HOOKED_MODULE,
                                                             errors.BAD_OVERRIDE):
                    raise error from error.__cause__
                failed[path] = (Unconverted(path, type(block).__name__, f"[{error.kind}] {error.explanation}"), error)
                built[id(block)] = None
        if built[id(block)] is not None and not path:
            raise errors.AutocalError(
                errors.NO_MOE_BLOCK, "the model itself is the MoE block, so there is no parent to put its "
                "calibration module in", block_class=type(block).__name__,
                hints=["use autocal.synthesize(block) for one block, or convert a model that holds it"])
        if built[id(block)] is not None:
            _set_submodule(model, path, built[id(block)])
            done.append(path)
    skipped += _left_unconverted(failed, done, strict)
    model.__dict__[UNCONVERTED] = skipped
    if skipped:
        warnings.warn(f"autocal: {len(skipped)} MoE block(s) left unconverted (strict=False): "
                      + "; ".join(str(s) for s in skipped), stacklevel=2)
    if not skipped and not any(isinstance(m, MoECalibrationModule) for m in model.modules()):
        raise errors.AutocalError(errors.NO_MOE_BLOCK, "the model holds no MoE block" + "".join(
                                      f"; {line} (nothing to rewrite)" for line in ruled_out),
                                  block_class=type(model).__name__,
                                  hints=["autocal looks for a child module storing weights per expert, "
                                         "called with the indices of a top-k"])
    if calibration_chunk_size is not None:
        set_calibration_chunk_size(model, calibration_chunk_size)
    if not group_experts:
        for module in model.modules():
            if isinstance(module, CalibrationExperts):
                module.group_experts = False
    return model


def _left_unconverted(failed: dict[str, tuple[Unconverted, errors.AutocalError]], done: list[str],
                      strict: bool) -> list[Unconverted]:
    """The blocks ``convert`` failed on, less those inside a candidate tried after them (converted, or failed
    too): theirs is that candidate's to report. With ``strict``, the first is raised instead."""
    tried = [*done, *failed]
    left = [(path, entry) for path, entry in failed.items() if not any(enclosed(path, t) for t in tried)]
    if strict and left:
        error = left[0][1][1]
        raise error from error.__cause__
    return [unconverted_ for _, (unconverted_, _) in left]


def set_calibration_chunk_size(model: nn.Module, tokens: int | None) -> list[str]:
    """Bound calibration's activation memory: each expert's unrouted tokens in chunks of ``tokens`` (None: no bound).

    In every calibration module that can chunk (experts unpacked from a packed
    container, most transformers v5 models), calibration mode then runs each
    expert on its routed tokens, as with calibration off, and on the rest in
    chunks of at most ``tokens``. The output is the calibration-off output, bitwise,
    and every expert Linear still sees every token once, over several calls.
    It is slower than the grouped run (one call per chunk), which holds
    several experts' outputs on all tokens at once.

    Returns the paths of calibration modules that cannot chunk (their experts
    run on all tokens at once), after a warning naming them.
    """
    checked_chunk_size(tokens)  # before any module is set
    unbounded = []
    for path, module in model.named_modules():
        if not isinstance(module, MoECalibrationModule):
            continue
        if isinstance(getattr(type(module), "calibration_chunk_size", None), property):
            module.calibration_chunk_size = tokens
        elif tokens is not None:
            unbounded.append(path)
    if unbounded:
        classes = sorted({type(model.get_submodule(p)).__name__ for p in unbounded})
        warnings.warn(f"autocal: {len(unbounded)} calibration module(s) ({', '.join(classes)}; first: "
                      f"{unbounded[0] or '<model>'}) cannot run their experts in token chunks: they run each expert "
                      f"on all tokens at once in calibration mode. Chunking needs experts that autocal unpacked "
                      f"from a packed container (see autocal.explain).", stacklevel=2)
    return unbounded


def _progress(items: list) -> Any:
    if len(items) < 8:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="autocal: converting MoE blocks", unit="block")


def restore(model: nn.Module) -> nn.Module:
    """Put the original back in place of every non-permanent calibration module."""
    for path, module in list(model.named_modules()):
        if isinstance(module, MoECalibrationModule) and not module.is_permanent and path:
            _set_submodule(model, path, module.restore(module.__dict__.get("_original")))
    return model


@contextmanager
def calibration_context(model: nn.Module, calibrate_all_experts: bool = True) -> Iterator[nn.Module]:
    """Convert on entry and set every calibration module's mode; on exit (also on error) restore the
    non-permanent blocks it converted and end calibration mode.

    Blocks the model already held converted (an earlier ``convert``) stay converted, and get their earlier
    mode back on exit: the context is about calibration mode, not about undoing the user's own ``convert``.

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block
        >>> model = torch.nn.Sequential(make_toy_block(ToyMoEConfig()))
        >>> with calibration_context(model) as m:
        ...     m[0].calibrate_all_experts
        True
    """
    earlier = {module: module.calibrate_all_experts for module in model.modules()
               if isinstance(module, MoECalibrationModule)}
    convert(model, calibrate_all_experts)
    try:
        for module in model.modules():
            if isinstance(module, MoECalibrationModule):
                module.calibrate_all_experts = calibrate_all_experts
        yield model
    finally:
        for path, module in list(model.named_modules()):
            if isinstance(module, MoECalibrationModule) and module not in earlier:
                module.calibrate_all_experts = False
                if not module.is_permanent and path:
                    _set_submodule(model, path, module.restore(module.__dict__.get("_original")))
        for module, mode in earlier.items():
            module.calibrate_all_experts = mode
