"""``save_pretrained``: the per-expert checkpoint layout, checked before writing and verified after."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ... import errors
from .blocks import ExpertLinear, _join, _listing, calibration_blocks, expert_linears
from .naming import _revert, saved_names

__all__ = [
    "CheckpointLayout",
    "CheckpointLayoutError",
    "SavedCheckpoint",
    "check_state_dict",
    "checkpoint_layout",
    "install_checked_save",
    "load_saved_state_dict",
    "save_pretrained",
    "shared_storage_groups",
    "unshare",
    "verify_saved",
]


SAFETENSORS_GLOB = "*.safetensors"


class CheckpointLayoutError(errors.AutocalError, ValueError):
    """A state dict does not have the per-expert layout vLLM and transformers expect; nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(errors.CHECKPOINT_LAYOUT, _listing("checkpoint layout", problems))


@dataclass
class CheckpointLayout:
    """The keys a saved state dict must hold for the converted experts.

    ``experts``: saved key prefix of every expert Linear (``…experts.{i}.w1``), to the in-model path.
    ``containers``: saved prefix of each experts container, to the number of experts and the names
    its children may use (their Linears', and tensors an expert holds itself, ``gate_multiplier``);
    ``members``: other keys allowed under a container (its own shared tensors); ``keys``: the experts' names
    in each container (their numbers in a list, ``expert_0`` … in a ``ModuleDict``).
    ``tied``: pairs of keys transformers declares tied (allowed to share storage).
    """

    experts: dict[str, str]
    containers: dict[str, tuple[int, frozenset[str]]]
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    tied: frozenset[frozenset[str]] = frozenset()
    keys: dict[str, frozenset[str]] = field(default_factory=dict)


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """The layout ``save_pretrained`` must produce for ``model`` (uses its save-time conversions)."""
    linears = expert_linears(model)
    saved = saved_names(model, [_join(lin.path, "weight") for lin in linears])
    experts: dict[str, str] = {}
    containers: dict[str, tuple[int, set[str]]] = {}
    counts: dict[str, int] = {}
    children: dict[str, set[str]] = {}  # the experts' names in each container (in the model)
    for linear in linears:
        key = _join(linear.block, linear.container)
        counts[key] = max(counts.get(key, 0), linear.expert + 1)
        children.setdefault(key, set()).add(linear.child)
    keys: dict[str, frozenset[str]] = {}
    for linear in linears:
        prefix = saved[_join(linear.path, "weight")][: -len(".weight")]
        experts[prefix] = linear.path
        in_model = _join(linear.block, linear.container)
        # ``{container}.{key}.{name}``, or ``{container}.{key}`` for a Linear that is the expert (a gathered weight's)
        container_key, _, rest = f"{prefix}.".rpartition(f".{linear.child}.")
        num, names = containers.setdefault(container_key, (counts[in_model], set()))
        names.add(rest.removesuffix("."))
        names.update(_own_tensors(model.get_submodule(_join(in_model, linear.child))))
        keys.setdefault(container_key, frozenset(children[in_model]))
    saved_elsewhere = _saved_outside_experts(model, linears)
    members = {container_key: frozenset(k[len(container_key) + 1:] for k in saved_elsewhere
                                        if k.startswith(f"{container_key}.")) for container_key in containers}
    tied = frozenset(frozenset((a, b)) for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items())
    return CheckpointLayout(experts, {k: (n, frozenset(v)) for k, (n, v) in containers.items()}, members, tied, keys)


def _saved_outside_experts(model: nn.Module, linears: list[ExpertLinear]) -> list[str]:
    """The saved keys of the model's tensors that no expert holds: a container's own tensors, and tensors
    held elsewhere that the model's save-time renamings put under an experts container (Laguna saves its
    router's ``gate.e_score_correction_bias`` as ``experts.e_score_correction_bias``)."""
    experts = tuple({f"{_join(linear.block, linear.container, linear.child)}." for linear in linears})
    return list(saved_names(model, [k for k in model.state_dict() if not k.startswith(experts)]).values())


def _own_tensors(expert: nn.Module) -> set[str]:
    """The tensors an expert holds outside its Linears (a gating multiplier), by name in the expert."""
    linears = {name for name, module in expert.named_modules() if isinstance(module, nn.Linear)}
    if "" in linears:  # the expert is one Linear
        return set()
    tensors = [n for n, _ in expert.named_parameters()] + [n for n, _ in expert.named_buffers()]
    return {n for n in tensors if n.rpartition(".")[0] not in linears}


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


def check_state_dict(state_dict: Mapping[str, torch.Tensor], layout: CheckpointLayout, *,
                     handed: Mapping[str, torch.Tensor] | None = None) -> None:
    """Raise ``CheckpointLayoutError`` unless ``state_dict`` (as it will be written) is per-expert and unshared.

    - every expert Linear has a weight under its saved prefix (``P.weight`` or ``P.weight_packed``);
    - under an experts container, only ``{i}.{name}.…`` keys with ``i`` < number of experts and
      ``name`` one of the expected Linear names (or tensors the model saves there): no packed tensor;
    - no two tensors of ``handed`` (what ``save_pretrained`` is given; ``state_dict`` by default) share
      storage (safetensors and transformers mishandle them), tied weights aside. Views that transformers'
      own save-time conversions make of one tensor (Kimi-Linear's q, k and v convolutions split from one
      weight) are its business: it writes them.
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
            if head.isdigit() or head in layout.keys.get(container, ()):
                name = next((n for n in names if tail == n or tail.startswith(n + ".") or not n and tail), None)
                if head.isdigit() and int(head) >= num:
                    problems.append(f"{key}: expert index {head} >= {num} experts")
                elif name is None:
                    problems.append(f"{key}: not one of the expert Linears {sorted(names)}")
            elif rest not in layout.members.get(container, ()):
                problems.append(f"{key}: packed or unknown tensor under experts container {container}")
    for group in shared_storage_groups(state_dict if handed is None else handed, layout.tied):
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


def _state_dict_to_write(model: nn.Module, layout: CheckpointLayout,
                         state_dict: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                        dict[str, torch.Tensor]]:
    """(the state dict to hand ``save_pretrained``, the one it will write), mirroring transformers 5.17.

    ``state_dict``: the one the caller gave ``save_pretrained``, if any; the model's otherwise."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v.detach() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
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


def _checked_save_pretrained(model: nn.Module, save_directory: str | Path, *, state_dict: dict | None = None,
                             verify: bool = False, **kwargs: Any) -> None:
    """transformers' ``save_pretrained`` of what is in memory, with the state dict checked before anything is written.

    The model's own ``save_pretrained`` once ``install_checked_save`` ran: unpacked views get their own
    storage, the layout is checked (``check_state_dict``), then transformers writes. ``verify`` reads
    every written tensor back; off by default here, since it loads the whole checkpoint at once.
    """
    layout = checkpoint_layout(model)
    state, to_write = _state_dict_to_write(model, layout, state_dict)
    check_state_dict(to_write, layout, handed=state)
    type(model).save_pretrained(model, str(save_directory), state_dict=state, **kwargs)
    if verify:
        verify_saved(save_directory, to_write)


_CHECKED = "_autocal_checked_save"
setattr(_checked_save_pretrained, _CHECKED, True)


def install_checked_save(model: nn.Module) -> None:
    """Make the model's own ``model.save_pretrained(...)`` the checked save (``_checked_save_pretrained``).

    LLM Compressor's ``oneshot`` wraps ``model.save_pretrained`` (``modify_save_pretrained``: compress,
    call the method it wrapped, then write the quantization config and recipe), and leaves a method it
    already wrapped alone. Installed first, the checked save is what it wraps, so a plain
    ``model.save_pretrained(dir, save_compressed=True)`` compresses, checks, and only then writes. A
    wrapper of LLM Compressor's already in place is rebuilt around the checked save. Idempotent.
    """
    current = getattr(model, "save_pretrained", None)
    if current is None or getattr(current, _CHECKED, False):  # not transformers', or checked already
        return
    model.save_pretrained = MethodType(_checked_save_pretrained, model)
    if getattr(current, "_overridden", False):  # LLM Compressor's wrapper, around transformers' own save
        from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

        modify_save_pretrained(model)


def _saved_keys(save_directory: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(save_directory.glob(SAFETENSORS_GLOB)):
        with safe_open(str(path), "pt") as handle:
            keys += list(handle.keys())
    return sorted(keys)


def save_pretrained(model: nn.Module, save_directory: str | Path, *, save_compressed: bool = True,
                    verify: bool = True, **kwargs: Any) -> SavedCheckpoint:
    """Save like LLM Compressor does (compressed-tensors format), checked before and verified after writing.

    Through ``model.save_pretrained``, with LLM Compressor's wrapper around the checked save
    (``install_checked_save``):

    1. compress in memory (``ModelCompressor.compress_model``, LLM Compressor's wrapper);
    2. build the state dict transformers will write (tied weights dropped, conversions reverted),
       with unpacked views given their own storage;
    3. ``check_state_dict`` against ``checkpoint_layout(model)``: on failure nothing is written;
    4. transformers' ``save_pretrained``, then LLM Compressor's config, recipe and quantization config;
    5. with ``verify``, reload every safetensors file and compare each tensor bitwise.

    Without the extra installed, steps 1 and 4 are transformers' own dense save.
    """
    if not calibration_blocks(model):
        raise errors.AutocalError(errors.BAD_INPUT, "the model holds no autocal calibration module: "
                                  "autocal_lc.save_pretrained saves a model autocal_lc.prepare converted; nothing "
                                  "was written", block_class=type(model).__name__,
                                  hints=["call autocal_lc.prepare(model) first (autocal_lc.oneshot calls it), then "
                                         "oneshot, then save"])
    install_checked_save(model)
    try:
        from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    except ImportError:  # without the extra: transformers' own save, dense (nothing was quantized)
        modify_save_pretrained = None
    if modify_save_pretrained is not None:
        modify_save_pretrained(model)
        kwargs["save_compressed"] = save_compressed
    save_directory = Path(save_directory)
    model.save_pretrained(str(save_directory), verify=verify, **kwargs)
    config_file = save_directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    keys = _saved_keys(save_directory)
    layout = checkpoint_layout(model)
    expert_keys = sum(1 for k in keys if k.rsplit(".", 1)[0] in layout.experts)
    return SavedCheckpoint(save_directory, keys, expert_keys, config.get("quantization_config"))
