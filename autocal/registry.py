"""``MoECalibrationModule``: the calibration-module contract and the override registry.

The contract is LLM Compressor's (``llmcompressor.modeling.moe_context``): a
subclass is constructed as ``cls(original, config, calibrate_all_experts=True)``,
has ``is_permanent``, and, when not permanent, ``restore(original)`` gives the
original module back. A subclass registered under a block class name with
``@MoECalibrationModule.register("ClassName")`` is used for that class instead
of synthesis. The registry is an explicit table: nothing registers itself when
a file is imported, other than the class the user decorates.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar

from torch import nn

from . import errors

__all__ = ["MoECalibrationModule", "registered_override"]

_OVERRIDES: dict[str, type["MoECalibrationModule"]] = {}


class MoECalibrationModule(nn.Module):
    """Base class of every calibration module, synthesized or hand-written.

    Subclasses implement ``__init__(self, original, config, calibrate_all_experts=True)``
    and ``forward`` with the original block's signature; with
    ``calibrate_all_experts`` True every token must reach every expert while the
    output stays the original's.

    Example:
        >>> @MoECalibrationModule.register("MyMoE")          # doctest: +SKIP
        ... class CalibrationMyMoE(MoECalibrationModule):
        ...     is_permanent = False
        ...     def __init__(self, original, config, calibrate_all_experts=True): ...
    """

    is_permanent: ClassVar[bool] = False

    def restore(self, original: nn.Module) -> nn.Module:
        """The module to put back after calibration (the original, by default)."""
        if self.is_permanent:
            raise errors.AutocalError(
                errors.NOT_RESTORABLE,
                f"{type(self).__name__} unpacked its experts and is permanent",
                hints=["keep the calibration module in place; it computes what the original did"],
            )
        return original

    @classmethod
    def register(cls, class_name: str) -> Callable[[type], type]:
        """Register the decorated class as the calibration module for blocks named ``class_name``."""
        if not isinstance(class_name, str) or not class_name:
            raise errors.AutocalError(errors.BAD_OVERRIDE, f"register() takes a class name, got {class_name!r}")

        def decorator(subclass: type) -> type:
            _check_contract(subclass, class_name)
            _OVERRIDES[class_name] = subclass
            return subclass

        return decorator

    @classmethod
    def unregister(cls, class_name: str) -> None:
        """Forget the override for ``class_name`` (synthesis is used again)."""
        _OVERRIDES.pop(class_name, None)


def _check_contract(subclass: type, class_name: str) -> None:
    """Reject an override that cannot honour the contract, at registration time."""
    problems = []
    if not (isinstance(subclass, type) and issubclass(subclass, MoECalibrationModule)):
        problems.append("it does not subclass autocal.MoECalibrationModule")
    else:
        params = list(inspect.signature(subclass.__init__).parameters)
        if params[:3] != ["self", "original", "config"] or "calibrate_all_experts" not in params:
            problems.append("its __init__ is not (self, original, config, calibrate_all_experts=True)")
        if subclass.forward is nn.Module.forward:
            problems.append("it defines no forward()")
        if not isinstance(subclass.__dict__.get("is_permanent", subclass.is_permanent), bool):
            problems.append("is_permanent is not a bool")
    if problems:
        raise errors.AutocalError(
            errors.BAD_OVERRIDE,
            f"the override registered for {class_name} breaks the contract: " + "; ".join(problems),
            block_class=class_name,
        )


def registered_override(class_name: str) -> type[MoECalibrationModule] | None:
    return _OVERRIDES.get(class_name)
