"""transformers: building models from configs (``autocal explain config.json``), and its runtime contract.

The runtime contract that tracing and detection read (the experts
implementation, declared router outputs) lives below them, in
``autocal/trace/hf.py``; it is re-exported here, where users look for it.
"""

from __future__ import annotations

from ..trace.hf import EXPERTS_IMPLEMENTATION_ATTR, declared_routers, eager_experts, experts_implementation

__all__ = ["eager_experts", "experts_implementation", "EXPERTS_IMPLEMENTATION_ATTR", "declared_routers",
           "load_config", "meta_model"]


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
