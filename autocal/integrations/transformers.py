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

__all__ = ["eager_experts", "EXPERTS_IMPLEMENTATION_ATTR"]

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
