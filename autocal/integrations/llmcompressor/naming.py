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
        prefix = plain_key[: -len(_join(linear.child, linear.name, "weight"))]
        candidates = [k for k, t in reverted.items()
                      if k.startswith(f"{prefix}{linear.child}.") and k.endswith(".weight")
                      and t.shape == weight.shape and torch.equal(t, weight)]
        if len(candidates) != 1:
            return {}  # absent (packed checkpoint) or ambiguous: keep autocal's names
        theirs = candidates[0][len(f"{prefix}{linear.child}."): -len(".weight")]
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
