"""Tiny random-weight transformers MoE models, one per architecture, for tests.

Each architecture has a JSON fixture in ``fixtures/models/<model_type>.json``::

    {"model_type": "...", "auto_class": "AutoModelForCausalLM",
     "config": {...}, "config_5_17": {...optional...}, "notes": "..."}

``config`` holds the keyword arguments of ``AutoConfig.for_model(model_type, **config)``
(sub-configs as nested dicts). ``config_5_17`` is merged over it (recursively) when the
installed transformers is older than 5.18.

This module is test data support: it imports only torch, transformers and the standard
library, never autocal itself.

Example:
    >>> from autocal.testing import zoo
    >>> model = zoo.build_model("mixtral")
    >>> out = zoo.forward_module(model)(**zoo.example_inputs(model))

Regenerate the architecture list / find missing fixtures with ``python scripts/regen_moe_list.py``.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers

__all__ = [
    "FIXTURES_DIR",
    "NOT_MOE",
    "build_config",
    "build_model",
    "example_inputs",
    "fixture_names",
    "folder_model_type",
    "forward_module",
    "load_fixture",
    "modeling_sources",
    "moe_architectures",
    "transformers_version",
]

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "models"

# Source markers of MoE code in ``transformers/models/<folder>/modeling_*.py``.
MOE_MARKERS = re.compile(r"use_experts_implementation|num_experts|n_routed_experts|num_local_experts")

# Folders whose modeling source matches MOE_MARKERS but that contain no MoE, checked by hand.
NOT_MOE: dict[str, str] = {
    "bamba": "`num_experts = 1` is hard-coded in BambaDecoderLayer.__init__, which always builds a dense BambaMLP",
}

# Init scales used by build_model (see _init_weights).
WEIGHT_STD = 0.2
BIAS_STD = 0.02
_VERSION_5_18 = (5, 18)


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


def fixture_names() -> list[str]:
    """Sorted model types that have a fixture file."""
    return sorted(p.stem for p in FIXTURES_DIR.glob("*.json"))


def load_fixture(name: str) -> dict[str, Any]:
    """The parsed fixture ``fixtures/models/<name>.json``."""
    path = FIXTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no zoo fixture for {name!r} (expected {path})")
    return json.loads(path.read_text())


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _config_kwargs(fixture: dict[str, Any]) -> dict[str, Any]:
    kwargs = copy.deepcopy(fixture["config"])
    if transformers_version() < _VERSION_5_18 and "config_5_17" in fixture:
        kwargs = _deep_merge(kwargs, copy.deepcopy(fixture["config_5_17"]))
    return kwargs


def build_config(name: str) -> transformers.PretrainedConfig:
    """The transformers config object described by fixture ``name``."""
    fixture = load_fixture(name)
    return transformers.AutoConfig.for_model(fixture["model_type"], **_config_kwargs(fixture))


def build_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    experts_implementation: str = "eager",
) -> torch.nn.Module:
    """Build the tiny model of fixture ``name`` in eval mode.

    Weights are re-initialised (seeded) so that MoE outputs and routing are not negligible:
    matrices ~ N(0, 0.2), biases ~ N(0, 0.02); normalisation layers and other 1-D parameters
    keep transformers' own init. Parameters named by the model's ``_keep_in_fp32_modules(_strict)``
    are kept in fp32 for low-precision dtypes, as ``from_pretrained`` does.

    Args:
        name: fixture name (a transformers model type, see ``fixture_names()``).
        dtype: parameter dtype.
        device: target device; ``"meta"`` builds without storage and skips the init.
        seed: seed of the re-initialisation.
        experts_implementation: transformers experts implementation ("eager", "batched_mm",
            "grouped_mm"); ignored by models whose experts are not ``@use_experts_implementation``.

    Example:
        >>> model = build_model("qwen3_moe", seed=1)
    """
    fixture = load_fixture(name)
    config = build_config(name)
    auto_cls = getattr(transformers, fixture["auto_class"])
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto_cls.from_config(config, dtype=dtype)
    _set_experts_implementation(model, experts_implementation)
    _keep_in_fp32(model, dtype)
    if device.type != "meta":
        _init_weights(model, seed)
    return model.eval()


def _set_experts_implementation(model: torch.nn.Module, implementation: str) -> None:
    try:
        model.set_experts_implementation(implementation)
    except ValueError as err:
        # Raised by `_grouped_mm_can_dispatch` for models without `@use_experts_implementation` experts
        # ("eager" is always accepted); those models keep their only (native) implementation.
        if "does not support setting experts implementation" not in str(err):
            raise
        return
    # `set_experts_implementation` only reaches configs of PreTrainedModel sub-models; experts that hold
    # a private config copy (dots3_note's vision tower: one per-layer config per block) keep the default.
    for module in model.modules():
        config = getattr(module, "config", None)
        decorated = all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "is_concatenated"))
        if decorated and getattr(config, "_experts_implementation", implementation) != implementation:
            config._experts_implementation = implementation


def _keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Upcast what ``_keep_in_fp32_modules(_strict)`` names, as ``from_pretrained`` does (``from_config`` does not);
    e.g. inkling2's router weight, which its forward multiplies with fp32 activations."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pattern = re.compile("|".join(f"(?:{key})" for key in plan))
    for mod_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                full_name = f"{mod_name}.{name}" if mod_name else name
                if tensor is not None and tensor.is_floating_point() and pattern.search(full_name):
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.float()
                    else:
                        store[name] = tensor.float()


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if _is_norm(module):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            if pname == "dt_bias":
                continue  # SSM time-step bias: keep transformers' (softplus-inverse) init
            if pname == "bias" or pname.endswith("_bias"):
                std = BIAS_STD
            elif param.dim() >= 2:
                std = WEIGHT_STD
            else:
                continue  # scales, A_log, D, sinks, ...: keep transformers' init
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            param.copy_(noise.to(device=param.device, dtype=param.dtype))


def _special_token_ids(config: Any) -> set[int]:
    """Every ``*token_id*`` / ``*token_index*`` integer in the config and its sub-configs."""
    ids: set[int] = set()
    stack, seen = [config], set()
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if isinstance(value, transformers.PretrainedConfig):
                stack.append(value)
            elif ("token_id" in key or "token_index" in key) and "pad" not in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _vocab_size(config: Any) -> int:
    text = config.get_text_config(decoder=True)
    for cfg in (text, config):
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    raise ValueError(f"cannot find vocab_size in {type(config).__name__}")


def _random_ids(config: Any, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    vocab = _vocab_size(config)
    special = _special_token_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    return allowed[torch.randint(len(allowed), shape, generator=gen)]


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call for a forward pass: ``model`` itself, or, for a composite model that has no
    ``forward`` of its own (qwen3_omni_moe is generate-only), its first sub-model that has one.

    Example:
        >>> model = build_model("qwen3_omni_moe")
        >>> forward_module(model) is model.thinker
        True
    """
    if type(model).forward is not torch.nn.Module.forward:
        return model
    for child in model.children():
        if isinstance(child, transformers.PreTrainedModel) and type(child).forward is not torch.nn.Module.forward:
            return child
    raise TypeError(f"{type(model).__name__} has no forward and no sub-model with one")


def example_inputs(model: torch.nn.Module, *, batch: int = 1, seq: int = 6, seed: int = 0) -> dict[str, Any]:
    """Minimal keyword arguments for ``forward_module(model)(**inputs)``, on the model's device.

    Text-only ``input_ids`` for LMs and VLMs (never a special/image token id), plus
    ``decoder_input_ids`` where the forward takes them (encoder-decoders; diffusion_gemma's
    canvas, of ``config.canvas_length`` tokens); ``pixel_values`` (and ``dataset_index``) for
    vision backbones.

    Args:
        model: a model from ``build_model``.
        batch: batch size.
        seq: number of (encoder) tokens.
        seed: seed of the random ids / pixels.

    Example:
        >>> inputs = example_inputs(model, batch=2, seq=8)
        >>> out = forward_module(model)(**inputs)
    """
    module = forward_module(model)
    config = module.config
    gen = torch.Generator().manual_seed(seed)
    device = next(module.parameters()).device
    if getattr(module, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.randn((batch, config.num_channels, *size), generator=gen)
        inputs: dict[str, Any] = {"pixel_values": pixels.to(dtype=module.dtype)}
        if getattr(config, "num_experts", 1) > 1:
            inputs["dataset_index"] = torch.arange(batch) % config.num_experts
    else:
        inputs = {"input_ids": _random_ids(config, (batch, seq), gen)}
        if "decoder_input_ids" in inspect.signature(module.forward).parameters:
            dec_len = getattr(config, "canvas_length", None) or max(seq // 2, 1)
            inputs["decoder_input_ids"] = _random_ids(config, (batch, dec_len), gen)
    return {k: v.to(device) for k, v in inputs.items()}


@lru_cache(maxsize=None)
def folder_model_type(folder: str) -> str | None:
    """The top-level model type defined in ``transformers/models/<folder>`` (``None`` if none)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    candidates = [mt for mt in CONFIG_MAPPING.keys() if model_type_to_module_name(mt) == folder]
    if folder in candidates:
        return folder
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    # Several configs live in the folder: keep the one that is not a sub-config of another.
    nested = set()
    for mt in candidates:
        for sub in (getattr(CONFIG_MAPPING[mt], "sub_configs", None) or {}).values():
            nested.add(getattr(sub, "model_type", None))
    roots = [mt for mt in candidates if mt not in nested]
    return roots[0] if len(roots) == 1 else None


def moe_architectures() -> list[str]:
    """Model types of the installed transformers whose model is an MoE.

    Two sources, both read from transformers' own tables:

    * every modeling folder ``transformers/models/<folder>/modeling_*.py`` that matches MOE_MARKERS (minus NOT_MOE),
      counted once, under its top-level model type;
    * every model type of the auto mappings (``CONFIG_MAPPING_NAMES``) whose own folder has no modeling code and
      whose model class (``MODEL_MAPPING_NAMES``) is defined in one of those MoE folders: config-only types that
      reuse another architecture's classes (5.25's sarvam_moe builds a ``Glm4MoeModel``).
    """
    return sorted(set(_moe_folders().values()) | set(_config_only_moe_types()))


@lru_cache(maxsize=None)
def _moe_folders() -> dict[str, str]:
    """{MoE modeling folder: its top-level model type}."""
    folders = {}
    for path in _models_dir().glob("*/modeling_*.py"):
        folder = path.parent.name
        if folder in NOT_MOE or not MOE_MARKERS.search(path.read_text(encoding="utf-8")):
            continue
        model_type = folder_model_type(folder)
        if model_type is None:
            raise RuntimeError(f"cannot map transformers/models/{folder} to a single model type")
        folders[folder] = model_type
    return folders


def _config_only_moe_types() -> dict[str, str]:
    """{config-only MoE model type: the MoE folder that defines its model class}."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    defined_in = {name: folder for folder in _moe_folders() for name in _classes_defined_in(folder)}
    found = {}
    for model_type in CONFIG_MAPPING_NAMES:
        folder = _models_dir() / model_type_to_module_name(model_type)
        if any(folder.glob("modeling_*.py")):
            continue  # a folder with its own modeling code is judged by the scan of folders
        model_class = MODEL_MAPPING_NAMES.get(model_type)
        if isinstance(model_class, str) and model_class in defined_in:
            found[model_type] = defined_in[model_class]
    return found


def _classes_defined_in(folder: str) -> set[str]:
    names = set()
    for path in (_models_dir() / folder).glob("modeling_*.py"):
        names.update(re.findall(r"^class (\w+)\(", path.read_text(encoding="utf-8"), flags=re.MULTILINE))
    return names


def modeling_sources() -> dict[str, list[Path]]:
    """For each MoE model type (``moe_architectures``), the modeling files its model is defined in: its own
    folder's, or, for a config-only type, those of the folder whose classes it builds."""
    sources = {t: sorted((_models_dir() / f).glob("modeling_*.py")) for f, t in _moe_folders().items()}
    for model_type, folder in _config_only_moe_types().items():
        sources[model_type] = sorted((_models_dir() / folder).glob("modeling_*.py"))
    return dict(sorted(sources.items()))


def _models_dir() -> Path:
    return Path(transformers.__file__).resolve().parent / "models"
