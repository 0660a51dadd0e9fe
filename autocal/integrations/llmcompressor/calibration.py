"""``oneshot``: ``llmcompressor.oneshot`` with every expert calibrated, then the coverage check."""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from .blocks import calibration_blocks, gate_modules
from .checkpoint import install_checked_save, save_pretrained
from .naming import _RENAMINGS_ATTR, install_checkpoint_names
from .preparation import check_linearization, prepare
from .tracking import Coverage, CoverageTracker, _lc_hooks_live, coverage

__all__ = [
    "oneshot",
    "set_calibration",
]


def _with_ignore(recipe: Any, extra: list[str]) -> Any:
    """Copies of the recipe's modifiers with ``extra`` added to every ``ignore`` list."""
    if not extra:
        return recipe
    if isinstance(recipe, (list, tuple)):
        return type(recipe)(_with_ignore(r, extra) for r in recipe)
    ignore = getattr(recipe, "ignore", None)
    if isinstance(ignore, list) and hasattr(recipe, "model_dump"):
        merged = ignore + [name for name in extra if name not in ignore]
        # Built anew, not ``model_copy(update=...)``: a quantization modifier resolves its config (ignore list
        # included) when it is validated, and a copy keeps the resolved one, so the gates were quantized anyway.
        return type(recipe)(**{**recipe.model_dump(exclude_unset=True), "ignore": merged})
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
            save_compressed: bool = True, propagate_routed: bool = False, **oneshot_kwargs: Any) -> Coverage:
    """``llmcompressor.oneshot`` on an autocal-converted model; returns the per-expert ``Coverage``.

    Converts first (``prepare``) if the model has no calibration module. Every
    quantization modifier's ``ignore`` gets the detected gates unless
    ``quantize_gates``. During the call every calibration module runs every token
    through every expert (``calibrate_all_experts``, also passed on as
    ``moe_calibrate_all_experts`` for blocks LLM Compressor linearizes itself),
    in every pass, as LLM Compressor's own path does, so by default the quantized
    model is the one that path gives on the same data. Afterwards calibration is
    off, so the model runs as the original would.

    Args:
        model: a transformers model (``from_pretrained``).
        recipe: LLM Compressor modifiers (or a recipe LLM Compressor accepts).
        check: raise ``CoverageError`` if an expert Linear missed tokens or quantization parameters.
        require_all_tokens: count it a problem when an expert Linear saw fewer tokens than its block
            (with ``calibrate_all_experts=False`` experts see only their routed tokens).
        output_dir: if given, save with ``save_pretrained`` below (checked) rather than LLM Compressor's save.
        propagate_routed: opt-in, faster, and not LLM Compressor's result. In passes with every LLM
            Compressor hook disabled (the sequential pipeline's propagation passes, which only carry a
            layer's output to the next), run the experts on their routed tokens alone: E/k times less
            expert work there. That output equals the default's within rounding only, and the later
            layers' calibration sees the difference (docs/llmcompressor.md gives the measured figures).
        **oneshot_kwargs: passed to ``llmcompressor.oneshot`` (dataset, processor, num_calibration_samples, …).
    """
    import llmcompressor

    _check_name_or_path(model)
    if not calibration_blocks(model):
        prepare(model)
    check_linearization(model)
    if not hasattr(model, _RENAMINGS_ATTR):  # converted with autocal.convert rather than prepare
        install_checkpoint_names(model)
    install_checked_save(model)  # before LLM Compressor wraps model.save_pretrained, so that it wraps the checked save
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
