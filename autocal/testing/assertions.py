"""Assertions shared by tests: coverage hooks and equivalence with the original."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..registry import MoECalibrationModule
from ..verify import rows_seen

__all__ = ["expert_linears", "count_rows"]


def expert_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the experts containers of calibration modules (every expert set's, and the lists
    parallel to them: one per projection), by path."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, MoECalibrationModule):
            structure = module.structure
            for router_info, experts in [(structure.router, structure.experts), *structure.more_sets]:
                router = router_info.module_path or None
                for within, name, sub in ((w, n, s) for w in (experts.module_path, *experts.parallel)
                                          for n, s in module.get_submodule(w).named_modules()):
                    inner = f"{within}.{name}".strip(".")
                    if isinstance(sub, nn.Linear) and not (router and (inner + ".").startswith(router + ".")):
                        found[f"{path}.{inner}".lstrip(".")] = sub
    return found


@contextmanager
def count_rows(modules: dict) -> Iterator[dict]:
    """Count the input rows (tokens) each module sees while the context is open, by name."""
    names = list(modules)
    with rows_seen([modules[n] for n in names]) as seen:
        counts: dict = {}
        yield counts
        counts.update(zip(names, seen))
