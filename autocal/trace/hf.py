"""transformers' runtime contract, read from instances (never from source text), for the trace and detect stages.

transformers v5 decorates experts classes with ``use_experts_implementation``:
their forward dispatches on ``module.config._experts_implementation`` to an
eager loop, ``batched_mm`` or ``grouped_mm``. Only the eager loop selects one
expert at a time, which is what the recording needs to see, so tracing pins it
for the duration of the trace. Modules without that attribute are untouched;
the recording and the numeric checks decide everything else.

Nothing here imports transformers: it reads attributes of the modules it is given.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eager_experts", "experts_implementation", "EXPERTS_IMPLEMENTATION_ATTR", "declared_routers"]

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
