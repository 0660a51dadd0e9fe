"""Checkpoint names: how the model's original checkpoint names each expert Linear, taught to ``save_pretrained``.

Derived from transformers' own conversion mapping for the model (what ``from_pretrained`` merges
and ``save_pretrained`` splits), never from a list of names."""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Mapping

import torch
from torch import nn
from transformers.core_model_loading import WeightRenaming

from ...registry import MoECalibrationModule
from .blocks import ExpertLinear, _join, calibration_blocks, expert_linears

__all__ = [
    "AutocalExpertRenaming",
    "checkpoint_names",
    "install_checkpoint_names",
    "saved_names",
]


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
    """``state_dict`` as transformers' ``save_pretrained`` would name (and convert) it.

    A conversion may look the runtime parameter up in the model by name (transformers' ``Transpose`` checks
    its shape): the packed parameters in ``state_dict`` are no longer in the model, autocal replaced their
    container, so they are looked up in ``state_dict`` first."""
    from transformers.core_model_loading import revert_weight_conversion

    model_parameter = model.get_parameter
    model.get_parameter = lambda name: state_dict[name] if name in state_dict else model_parameter(name)
    try:
        return revert_weight_conversion(model, dict(state_dict))
    finally:
        del model.get_parameter


SAMPLED_EXPERTS = 2  # experts of a packed container reverted to learn the checkpoint's names


def _first_experts(param: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The first ``SAMPLED_EXPERTS`` experts of a packed parameter: the slice along its one dimension of
    ``num_experts``; the whole parameter where no dimension, or more than one, has that size.

    transformers' save-time conversions (split per expert, un-concatenate gate and up, transpose) act on every
    expert alike, and copy what they split: on a whole DeepSeek-V3 layer that took most of ``prepare``'s time.
    The names are learnt from the experts sampled, and each is still checked by value (``_match_names``)."""
    dims = [d for d, size in enumerate(param.shape) if size == num_experts]
    if len(dims) != 1 or num_experts <= SAMPLED_EXPERTS:
        return param
    return param.narrow(dims[0], 0, SAMPLED_EXPERTS)


def _packed_state(block: MoECalibrationModule, block_path: str) -> tuple[dict[str, torch.Tensor], int]:
    """The parameters of the block's original experts container, under their model paths, narrowed to the
    first experts where the expert dimension is plain (``_first_experts``); and how many experts every
    parameter still holds."""
    structure = getattr(block, "structure", None)
    if structure is None:
        return {}, 0
    try:
        original = block.restore()
    except Exception:
        return {}, 0
    if original is None:
        return {}, 0
    container = original.get_submodule(structure.experts.module_path)
    num_experts = structure.experts.num_experts
    state = {_join(block_path, structure.experts.module_path, name): _first_experts(param, num_experts)
             for name, param in container.named_parameters(recurse=False)}
    narrowed = any(t.shape != p.shape for t, p in zip(state.values(), container.parameters(recurse=False)))
    return state, SAMPLED_EXPERTS if narrowed else num_experts


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
    load and save): the original packed parameters (their first experts) of the first block of each class
    are reverted to checkpoint format, and each unpacked Linear is matched to the
    reverted tensor it equals. Returns ``{container_leaf: {linear_name: checkpoint_name}}``
    with only the names that differ (Mixtral: ``{"experts": {"gate_proj": "w1", "up_proj": "w3",
    "down_proj": "w2"}}``); containers whose checkpoint stores packed tensors keep autocal's names.
    """
    by_block: dict[str, list[ExpertLinear]] = {}
    for linear in expert_linears(model):
        by_block.setdefault(linear.block, []).append(linear)
    blocks = [(path, block) for path, block in calibration_blocks(model) if path in by_block]
    firsts: dict[type, str] = {}
    for path, block in blocks:
        firsts.setdefault(type(block), path)
    packed, kept = _packed_states([(p, b) for p, b in blocks if _reverted_with(p, firsts.values())])
    try:
        reverted = _revert(model, packed) if packed else {}
    except Exception as error:  # transformers' conversion cannot split what autocal unpacked
        warnings.warn(f"autocal: transformers' save-time conversion of the experts of {', '.join(firsts.values())} "
                      f"failed ({type(error).__name__}: {error}); their checkpoint keys keep autocal's names "
                      "(gate_proj, up_proj, down_proj as unpacked)", stacklevel=2)
        return {}
    names: dict[str, dict[str, str]] = {}
    for block_path in firsts.values():
        sampled = [linear for linear in by_block[block_path] if linear.expert < kept.get(block_path, 0)]
        mapping = _match_names(model, sampled, reverted) if sampled else {}
        if not mapping:  # the checkpoint stores these experts packed, or no unique match: autocal's names
            _warn_if_stored_elsewhere(model, sampled, reverted)
            continue
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


def _reverted_with(path: str, firsts: Iterable[str]) -> bool:
    """Is the block at ``path`` reverted with the first blocks of each class: one of them, or a named sibling
    of one (``mlp.text_moe`` beside ``mlp.vision_moe``: transformers may merge both into one checkpoint list,
    and its conversion then needs both)? Blocks in a list (``layers.3``) are other layers, and left out."""
    parent, _, name = path.rpartition(".")
    return any(path == first or (not name.isdigit() and first.rpartition(".")[0] == parent) for first in firsts)


def _packed_states(blocks: list[tuple[str, MoECalibrationModule]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The packed parameters of the blocks' original experts containers (``_packed_state``), and the experts
    each block's still hold."""
    packed: dict[str, torch.Tensor] = {}
    kept: dict[str, int] = {}
    for path, block in blocks:
        state, kept[path] = _packed_state(block, path)
        packed.update(state)
    return packed, kept


def _match_names(model: nn.Module, linears: list[ExpertLinear], reverted: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{linear_name: checkpoint_name}`` from matching every expert's Linear weight to a reverted tensor."""
    mapping: dict[str, str] = {}
    for linear, prefix in zip(linears, _saved_container_prefixes(model, linears)):
        weight = model.get_submodule(linear.path).weight
        candidates = [k for k, t in reverted.items()
                      if k.startswith(f"{prefix}{linear.child}.") and k.endswith(".weight")
                      and t.shape == weight.shape and torch.equal(t, weight)]
        if len(candidates) != 1:
            return {}  # absent (packed checkpoint) or ambiguous: keep autocal's names
        theirs = candidates[0][len(f"{prefix}{linear.child}."): -len(".weight")]
        if mapping.setdefault(linear.name, theirs) != theirs:
            return {}
    return mapping


def _saved_container_prefixes(model: nn.Module, linears: list[ExpertLinear]) -> list[str]:
    """Where ``save_pretrained`` puts each Linear's experts container (``model.layers.0.ffn.experts.``).

    Found by renaming a key of the expert itself: the model's renamings may also rename the Linear's own name
    (DeepSeek-V4's ``.wgate.`` for ``.gate_proj.``), so its saved weight key cannot be cut at a fixed length."""
    probes = [_join(linear.block, linear.container, linear.child, "weight") for linear in linears]
    saved = saved_names(model, probes, with_autocal=False)
    return [saved[probe][: -len(f"{linear.child}.weight")] for probe, linear in zip(probes, linears)]


def _warn_if_stored_elsewhere(model: nn.Module, linears: list[ExpertLinear], reverted: dict[str, torch.Tensor]) -> None:
    """Warn where the original checkpoint stores expert weights as tensors of their own under keys that a
    renaming of their leaf names cannot give (Ernie-4.5-VL: text and vision experts in one list, the vision
    ones numbered after the text ones): the saved checkpoint then keeps autocal's keys for them."""
    plain = saved_names(model, [_join(lin.path, "weight") for lin in linears], with_autocal=False)
    moved = []
    for linear in linears:
        weight = model.get_submodule(linear.path).weight
        theirs = [k for k, t in reverted.items() if t.shape == weight.shape and torch.equal(t, weight)]
        ours = plain[_join(linear.path, "weight")]
        if theirs and ours not in theirs:
            moved.append(f"{theirs[0]!r} as {ours!r}")
    if moved:
        more = f" (and {len(moved) - 1} more of the experts sampled)" if len(moved) > 1 else ""
        warnings.warn(f"autocal: cannot rename these experts as the original checkpoint names them, and "
                      f"will save {moved[0]}{more}; a loader expecting the original's keys will not find them",
                      stacklevel=3)


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


def _only_on_unpacked(conversion, keys: list[str], unpacked: list[str]) -> bool:
    """Would the save-time form of ``conversion``, a converter that splits a packed runtime tensor into the
    checkpoint's per-expert tensors, act on the keys of Linears autocal unpacked, and on no other key?

    Such a match is never what the converter was written for: the tensor it splits no longer exists, and its
    pattern (transformers searches it anywhere in a key) found the packed tensor's name inside the name of a
    list autocal made from it. A block from outside the model's code whose packed weights carry the model's own
    names (``experts.gate_up_proj`` in a Qwen3-MoE model) had its Linears (``experts.gate_up_proj_experts.0``)
    split as if packed on save, into wrong tensors, or failed in transformers' split. Those converters are
    left out of what ``save_pretrained`` reverts; one that also matches other keys stays."""
    from transformers.core_model_loading import WeightConverter

    if not isinstance(conversion, WeightConverter):
        return False
    reverse = conversion.reverse_transform()
    matched = [k for k in keys if reverse.rename_source_key(k)[1] is not None]
    return bool(matched) and all(k.startswith(tuple(unpacked)) for k in matched)


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
    unpacked = [f"{lin.path}." for lin in expert_linears(model)]
    keys = list(model.state_dict())
    conversions = [c for c in conversions if not _only_on_unpacked(c, keys, unpacked)]
    model._weight_conversions = conversions + _renamings(names)
    setattr(model, _RENAMINGS_ATTR, names)
    return names
