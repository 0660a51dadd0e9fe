"""transformers' runtime contract, read from instances (never from source text).

transformers v5 decorates experts classes with ``use_experts_implementation``:
their forward dispatches on ``module.config._experts_implementation`` to an
eager loop, ``batched_mm`` or ``grouped_mm``. Only the eager loop selects one
expert at a time, which is what the recording needs to see, so tracing pins it
for the duration of the trace. Modules without that attribute are untouched;
the recording and the numeric checks decide everything else.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eager_experts", "experts_implementation", "EXPERTS_IMPLEMENTATION_ATTR", "declared_routers", "load_config", "meta_model"]

EXPERTS_IMPLEMENTATION_ATTR = "_experts_implementation"


def _configs(module: nn.Module) -> list:
    configs, seen = [], set()
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, EXPERTS_IMPLEMENTATION_ATTR):
            seen.add(id(config))
            configs.append(config)
    return configs


@contextmanager
def eager_experts(module: nn.Module) -> Iterator[None]:
    """Run decorated experts containers under ``module`` with their eager loop."""
    saved = [(config, getattr(config, EXPERTS_IMPLEMENTATION_ATTR)) for config in _configs(module)]
    try:
        for config, _ in saved:
            setattr(config, EXPERTS_IMPLEMENTATION_ATTR, "eager")
        yield
    finally:
        for config, implementation in saved:
            setattr(config, EXPERTS_IMPLEMENTATION_ATTR, implementation)


def experts_implementation(module: nn.Module) -> str | None:
    """The implementation decorated experts under ``module`` run (``"grouped_mm"``…); None: none applies."""
    return next((getattr(config, EXPERTS_IMPLEMENTATION_ATTR) for config in _configs(module)), None)


def declared_routers(model: nn.Module) -> list[str]:
    """Paths of the modules a transformers model declares as producing router logits.

    Models list, in ``_can_record_outputs["router_logits"]``, the module class
    whose output holds the router logits (for ``output_router_logits``). It is
    not used to find structure, only so that a declared MoE autocal does not
    recognise is reported instead of skipped.
    """
    recorders = []
    for module in model.modules():
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        recorders += declared if isinstance(declared, (list, tuple)) else [declared] if declared else []
    return [path for path, module in model.named_modules() if any(_records(r, path, module) for r in recorders)]


def _records(recorder, path: str, module: nn.Module) -> bool:
    """Does a transformers output recorder (a class, a path suffix, or an ``OutputRecorder``) hook ``module``?"""
    target = getattr(recorder, "target_class", recorder)
    suffix = recorder if isinstance(recorder, str) else getattr(recorder, "class_name", None)
    matches = (isinstance(target, type) and isinstance(module, target)) or bool(suffix and path.endswith(suffix))
    layer = getattr(recorder, "layer_name", None)  # e.g. nn.Linear, but only the one named "router"
    return matches and (not layer or f".{layer.strip('.')}." in f".{path}.")


# Auto classes tried, in order, to build a model from a config (composite
# vision-language configs only map to the image-text class).
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM", "AutoModel")


def load_config(path: str):
    """A transformers config from ``config.json`` or a model directory holding one.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or malformed.
    """
    import json
    from pathlib import Path

    import transformers

    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config file at {file}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file} has no \"model_type\": it is not a transformers config")
    model_type = data.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as error:
        raise ValueError(f"{file}: transformers {transformers.__version__} cannot read it ({error})") from None


def meta_model(config):
    """The model of ``config`` on the meta device: its structure, no memory for weights."""
    import torch
    import transformers

    errors = []
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name)
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except ValueError as error:  # this auto class has no mapping for the config
            errors.append(f"{name}: {str(error).splitlines()[0]}")
    raise ValueError("no transformers auto class builds this config: " + "; ".join(errors))
