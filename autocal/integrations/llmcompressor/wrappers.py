"""compressed-tensors' forward wrappers that ``autocal.linear_calls.call_linear`` may skip, and when.

LLM Compressor's pipelines wrap the forward of every targeted Linear twice (compressed-tensors 0.19):

- ``set_forward_quantized``'s ``quantized_forward`` fake-quantizes the input, the weight and the output,
  each where the scheme asks for it, unless quantization is disabled on the module; disabled, it calls the
  class's forward on the same tensors. LLM Compressor disables it for its calibration passes
  (``DisableQuantization`` in the sequential pipeline) and enables it again afterwards;
- ``offload_module``'s ``forward`` moves the arguments to the device the parameters are brought to, then
  calls the forward it wraps. ``call_linear`` computes only where the weight, as the module hands it out,
  is on the input's device, so that move has nothing to do.

The wrappers are recognised by the module and qualified name of their code; a compressed-tensors version
that names them otherwise is not recognised, and its Linears are called as modules (slower, the same
result).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...linear_calls import register_transparency_rule

__all__ = ["compressed_tensors_transparent", "hooked", "live", "install_transparency_rules"]

_QUANTIZED = ("compressed_tensors.quantization.lifecycle.forward", "set_forward_quantized.<locals>.quantized_forward")
_OFFLOADED = ("compressed_tensors.offload.module", "offload_module.<locals>.forward")
_installed: RemovableHandle | None = None
_NAMES: dict = {}  # code object -> (module, qualified name)


def _named(function: Callable) -> tuple[str, str]:
    """Where ``function`` was defined: its code's module and qualified name (``functools.wraps`` gives a wrapper
    the ``__module__`` and ``__qualname__`` of what it wraps, so those name ``nn.Linear.forward``). Remembered
    per code object: every Linear's wrapper is a closure of the same code."""
    code = getattr(function, "__code__", None)
    if code is None:
        return "", ""
    name = _NAMES.get(code)
    if name is None:
        name = _NAMES[code] = (getattr(function, "__globals__", {}).get("__name__", ""), code.co_qualname)
    return name


def compressed_tensors_transparent(linear: nn.Module, function: Callable, x: torch.Tensor) -> bool:
    """Is ``function`` a compressed-tensors wrapper that computes what it wraps, on ``linear`` and ``x``, now?"""
    name = _named(function)
    if name == _QUANTIZED:  # ``enabled`` as ``quantized_forward`` computes it, false
        return not (getattr(linear, "quantization_enabled", True) and getattr(linear, "quantization_scheme", None)
                    is not None and getattr(linear, "quantization_status", None) is not None)
    if name == _OFFLOADED:  # calls ``_original_forward_func``, which it wraps
        original = linear.__dict__.get("_original_forward_func")
        return original is not None and getattr(function, "__wrapped__", None) is original
    return False


def install_transparency_rules() -> None:
    """Register ``compressed_tensors_transparent`` with autocal, once per process."""
    global _installed
    if _installed is None:
        _installed = register_transparency_rule(compressed_tensors_transparent)


def hooked(handles: Iterable[RemovableHandle], modules: Iterable[nn.Module], function: Callable | None = None,
           pre_hooks: bool = False) -> list[tuple[nn.Module, RemovableHandle]]:
    """The hooks among ``handles`` (an LLM Compressor modifier's) on ``modules``, each with its module: the
    forward hooks that call ``function`` (through ``HooksMixin``'s wrapper), or with ``pre_hooks`` every
    forward pre-hook."""
    by_id = {handle.id: handle for handle in handles}
    pairs = []
    for module in modules:
        hooks = module._forward_pre_hooks if pre_hooks else module._forward_hooks
        pairs += [(module, by_id[number]) for number, hook in hooks.items()
                  if number in by_id and (pre_hooks or getattr(hook, "__wrapped__", None) == function)]
    return pairs


def live(linears: Sequence[nn.Module], inputs: Sequence[torch.Tensor],
         handle_of: dict[nn.Module, RemovableHandle]) -> tuple[Sequence[nn.Module], Sequence[torch.Tensor]]:
    """The Linears (and their inputs) whose hook ``handle_of`` names LLM Compressor would run now:
    ``HooksMixin.disable_hooks`` disables every hook but those it is told to keep."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    if not HooksMixin._HOOKS_DISABLED:
        return linears, inputs
    kept = [(linear, inp) for linear, inp in zip(linears, inputs)
            if handle_of.get(linear) in HooksMixin._HOOKS_KEEP_ENABLED]
    return [linear for linear, _ in kept], [inp for _, inp in kept]
