"""Example inputs for a whole transformers model, made from its config and forward signature.

``convert(model)`` with no ``example_inputs`` runs a ``PreTrainedModel`` once on
inputs made here, so that every block is analysed on the call its model really
makes: decoder layers that take masks and positions, blocks that take token ids
(hash routing), experts reached through other methods (attention-internal
experts), experts chosen by an input index. Nothing is listed per model: the
forward's own parameters say what it takes, and the config says the sizes.

- the main input (``main_input_name``): token ids drawn from the vocabulary minus
  every special token id the config names (no image or audio placeholder, whose
  features would be missing), or pixel values of the config's image size;
- ``attention_mask``: ones;
- every ``*token_type_ids`` parameter: zeros (plain text);
- ``decoder_input_ids``: token ids, as the main input (encoder-decoders, block diffusion);
- every ``*_index`` tensor parameter: ``0, 1, …`` per batch row (an index that picks
  among experts, such as a per-dataset expert, must reach at least two of them);
- a ``*position_ids`` parameter without a default: ``0, 1, …`` along the sequence.

The main input goes to the parameter of its name, or to the forward's first parameter where the
forward names it otherwise (remote code's ``forward(self, tokens, ...)``).

Any other module (a training framework's or a research repo's language model) that holds an
embedding table gets token ids below the table's size for every forward parameter without a
default, 0 for one annotated ``int`` (``token_example``): its blocks that take more than hidden states (token ids for hash
routing, a padding mask) are then analysed on the call the model makes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["forward_module", "model_example", "token_example", "TWIN_BUDGET"]

BATCH = 2
TOKENS = 8
# A meta-device model runs on a CPU twin that holds every weight but the stacked experts (see twin.py); above
# this many elements there, the model is not run and each block gets inputs made from its own parameters.
TWIN_BUDGET = 1 << 28


def forward_module(model: nn.Module) -> nn.Module | None:
    """What to call for a forward pass: ``model``, or, when its class has no forward of its own (a generate-only
    composite), its first sub-model that has one; None if neither."""
    if type(model).forward is not nn.Module.forward:
        return model
    for child in model.children():
        if _is_transformers_model(child) and type(child).forward is not nn.Module.forward:
            return child
    return None


def model_example(model: nn.Module, forward: nn.Module | None = None) -> tuple[list[dict[str, Any]], nn.Module] | None:
    """Keyword inputs for ``forward`` (default: ``forward_module(model)``), to try in turn, and the module to call.

    First every input above; then only the main input and the index inputs, for a forward that the optional
    ones lead where a tiny example cannot go (qwen3_omni's thinker computes multimodal positions when given
    a mask). None when ``model`` is not a transformers model, when its main input is neither token ids nor
    pixel values, or when it is on the meta device and its CPU twin would exceed ``TWIN_BUDGET`` elements.
    """
    if not _is_transformers_model(model) or (_on_meta(model) and _twin_elements(model) > TWIN_BUDGET):
        return None
    forward = forward or forward_module(model)
    config = getattr(forward, "config", None)
    if forward is None or config is None:
        return None
    parameters = inspect.signature(forward.forward).parameters
    generator = torch.Generator().manual_seed(0)
    main = getattr(forward, "main_input_name", "input_ids")
    if main == "input_ids":
        inputs = {_main_parameter(parameters, main): _token_ids(config, generator)}
    elif main == "pixel_values" and _image_shape(config) is not None:
        inputs = {_main_parameter(parameters, main): torch.randn((BATCH, *_image_shape(config)), generator=generator)}
    else:
        return None
    tokens = main == "input_ids"
    optional = {}
    for name, parameter in parameters.items():
        if name == "attention_mask" and tokens:
            optional[name] = torch.ones(BATCH, TOKENS, dtype=torch.long)
        elif name.endswith("token_type_ids") and tokens:
            optional[name] = torch.zeros(BATCH, TOKENS, dtype=torch.long)
        elif name.endswith("position_ids") and tokens and parameter.default is parameter.empty:
            inputs[name] = torch.arange(TOKENS).expand(BATCH, -1)
        elif name == "decoder_input_ids":
            inputs[name] = _token_ids(config, generator)
        elif name.endswith("_index") and _takes_tensor(parameter):
            inputs[name] = torch.arange(BATCH)
    candidates = [{**inputs, **optional}, inputs] if optional else [inputs]
    return [_placed(c, forward) for c in candidates], forward


def token_example(model: nn.Module) -> list[dict[str, torch.Tensor]] | None:
    """Keyword inputs for a module that is no transformers model, when it holds an embedding table: token ids below
    the first table's size (its padding index left out) for every forward parameter without a default, 0 for one
    annotated ``int`` (reference code's ``forward(tokens, start_pos: int)``).

    Nothing in such a module says it takes token ids: where these inputs do not run it (a forward taking images or
    latents, a batch dict), its blocks are analysed on inputs made from their own parameters, as before. None when
    the module holds no table, takes nothing without a default, or is on the meta device and its CPU twin would
    exceed ``TWIN_BUDGET`` elements.
    """
    table = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if _is_transformers_model(model) or table is None or (_on_meta(model) and _twin_elements(model) > TWIN_BUDGET):
        return None
    parameters = inspect.signature(model.forward).parameters.values()
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not required:
        return None
    allowed = torch.tensor([i for i in range(min(table.num_embeddings, 1 << 16)) if i != table.padding_idx] or [0])
    ids = allowed[torch.randint(len(allowed), (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))]
    inputs = _placed({p.name: ids for p in required if not _takes_int(p)}, model)
    return [{**inputs, **{p.name: 0 for p in required if _takes_int(p)}}]


def _takes_int(parameter: inspect.Parameter) -> bool:
    """Annotated ``int`` (a start position, a step): given 0, not token ids."""
    return parameter.annotation in (int, "int")


def _main_parameter(parameters: Mapping[str, inspect.Parameter], main: str) -> str:
    """The parameter that takes the main input: the one named so, else the forward's first (``tokens``, ``x``)."""
    if main in parameters:
        return main
    named = [p.name for p in parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named[0] if named else main


def _is_transformers_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _twin_elements(model: nn.Module) -> int:
    """Elements a CPU twin materializes: all but stacked (3-D or more) expert weights, which it expands."""
    return sum(p.numel() for p in model.parameters() if p.dim() < 3)


def _takes_tensor(parameter: inspect.Parameter) -> bool:
    return "Tensor" in str(parameter.annotation)


def _placed(inputs: dict[str, torch.Tensor], forward: nn.Module) -> dict[str, torch.Tensor]:
    """On the forward's device (the CPU for a meta model, whose twin runs there), floats in its dtype."""
    reference = next((p for p in forward.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None and not reference.is_meta else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _token_ids(config: Any, generator: torch.Generator) -> torch.Tensor:
    vocab = _vocab_size(config)
    special = _special_token_ids(config)
    allowed = torch.tensor([i for i in range(min(vocab, 1 << 16)) if i not in special] or [0])
    return allowed[torch.randint(len(allowed), (BATCH, TOKENS), generator=generator)]


def _vocab_size(config: Any) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for cfg in (text, config):
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return 2


def _special_token_ids(config: Any) -> set[int]:
    """Every ``*token_id*`` / ``*token_index*`` integer of the config and its sub-configs, padding aside."""
    ids: set[int] = set()
    stack, seen = [config], set()
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
                stack.append(value)
            elif ("token_id" in key or "token_index" in key) and "pad" not in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _image_shape(config: Any) -> tuple[int, ...] | None:
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size is None or channels is None:
        return None
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (channels, *size)
