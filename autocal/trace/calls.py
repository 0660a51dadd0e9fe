"""Each block's real inputs: run the model once on example inputs (its own, or made from its config) and keep
what every block's forward was called with.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from .. import errors
from ..numerics import kept_output
from .inputs import BlockCall
from .model_inputs import model_example, token_example
from .twin import cpu_twin, on_meta

__all__ = ["capture_calls", "locate_blocks", "unreached"]


def _capture_calls(model: nn.Module, paths: list[str], example_inputs: dict, forward: Any = None,
                   outputs: Collection[str] = ()) -> dict[str, BlockCall]:
    """Run the model once and keep each block's inputs, and the output of those in ``outputs``, copied before the
    model can write into it (verification compares against it instead of running the block again)."""
    calls: dict[str, BlockCall] = {}
    handles = []
    for path in paths:
        def keep_inputs(module, args, kwargs, path=path):
            calls.setdefault(path, BlockCall(args, kwargs))

        def keep_output(module, args, output, path=path):
            if calls[path].output is None:
                calls[path].output = kept_output(output)
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(keep_inputs, with_kwargs=True))
        handles += [module.register_forward_hook(keep_output)] if path in outputs else []
    versions = {name: buffer._version for name, buffer in model.named_buffers()}
    try:
        with torch.no_grad():
            (forward or model)(**example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    _warn_if_written(model, versions)
    return calls


def _warn_if_written(model: nn.Module, versions: dict[str, int]) -> None:
    """Warn where the model's run wrote into its buffers (a cache that reference code keeps as buffers): their
    values are no longer those the model had before ``convert``. Copying every buffer first to restore them
    would double the memory such caches take."""
    written = [name for name, buffer in model.named_buffers() if buffer._version != versions.get(name, buffer._version)]
    if written:
        shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        warnings.warn(f"autocal: running {type(model).__name__} to find its blocks' inputs wrote into its buffers "
                      f"{shown}; they no longer hold what they held before convert() (a cache is refilled on its "
                      "next use; anything else: reload the model, or pass example_inputs that leave them alone)",
                      stacklevel=4)


def unreached(error: errors.AutocalError, example_inputs: dict | None, calls: dict, path: str) -> errors.AutocalError:
    """``error``, saying so when the example inputs ran the model without ever calling this block's forward; where
    autocal made the model's inputs itself, and the block found nothing on the call they gave it (an expert set
    the made-up token types never choose), pointing to the user's own inputs."""
    if example_inputs and path not in calls and "never calls this block" not in error.explanation:
        error.explanation += ("; the example inputs ran the model without calling this block's forward "
                              "(its experts are used through other methods?)")
    elif not example_inputs and path in calls and error.kind in (errors.NO_MOE_BLOCK, errors.TRACE_FAILED):
        error.hints.append("the block was analysed on the call its model made on inputs autocal made up (token ids, "
                           "a mask of ones, token types of zeros: autocal/trace/model_inputs.py); pass inputs that "
                           "reach each of its branches: autocal.convert(model, example_inputs={...})")
    return error


def capture_calls(model: nn.Module, paths: list[str], example_inputs: dict | None, forward: Any = None,
                  outputs: Collection[str] = ()) -> tuple[dict[str, BlockCall], nn.Module | None]:
    """Each block's inputs when the model runs ``example_inputs`` (on a CPU twin if the model is on meta).

    Without ``example_inputs``, a transformers model runs on inputs made from its config and forward signature,
    any other module holding an embedding table on token ids (``trace/model_inputs.py``); a module given no
    inputs, or one those inputs do not run, gives no calls: its blocks get inputs made from their own parameters
    (with a warning for a transformers model only: nothing says another module takes token ids). The calls of the
    paths in ``outputs`` keep their output too.
    """
    if example_inputs is not None and not isinstance(example_inputs, Mapping):
        raise errors.AutocalError(
            errors.BAD_INPUT, f"example_inputs is a {type(example_inputs).__name__}: it must be a dict of the "
            "model's keyword inputs, which autocal calls the model with as model(**example_inputs)",
            hints=["autocal.convert(model, example_inputs={'input_ids': ids}), or a tokenizer's output: "
                   "example_inputs=tokenizer(text, return_tensors='pt')"])
    if not example_inputs:
        made = model_example(model, forward)
        guessed = token_example(model) if made is None and forward is None else None
        candidates, forward = made or (guessed or [], forward)
        for inputs in candidates:
            try:
                return capture_calls(model, paths, inputs, forward, outputs)
            except Exception as error:  # these inputs do not suit this model: try the next ones
                failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if made is None:  # token ids were a guess: nothing said the model takes them
            return {}, None
        warnings.warn(f"autocal: {type(model).__name__} did not run on the inputs autocal made for it ({failure}); "
                      f"its blocks are analysed on inputs made from their parameters. Pass example_inputs to "
                      f"convert().", stacklevel=3)
        return {}, None
    twin = cpu_twin(model) if on_meta(model) else None
    runner = _twin_of(forward, model, twin) if twin is not None else (forward or model)
    return _capture_calls(twin or model, paths, example_inputs, runner, outputs), twin


def locate_blocks(model: nn.Module, blocks: list[tuple[str, nn.Module]], example_inputs: dict | None,
                  forward: Any = None, also: list[str] = ()) -> tuple[list[tuple[str, nn.Module]],
                                                                   dict[str, BlockCall], nn.Module | None]:
    """The blocks, each block's inputs from the example (``capture_calls``), and the twin they ran on.

    A block whose forward the example never calls while its children are called
    is used through other methods (``experts.map(x)`` in an attention forward):
    it is replaced by its nearest ancestor whose forward the example calls.
    """
    paths = [p for p, _ in blocks]
    around = {a for p in paths for a in _ancestors(p)}
    children = {p: [f"{p}.{c}" if p else c for c, _ in model.get_submodule(p).named_children()] for p in paths}
    watched = list(dict.fromkeys([*paths, *also, *around, *(c for p in paths for c in children[p])]))
    first_of_class = {type(b): p for p, b in reversed(blocks)}.values()  # the blocks verification runs on
    calls, twin = capture_calls(model, watched, example_inputs, forward, outputs=set(first_of_class))
    located = []
    for path, block in blocks:
        if path not in calls and any(c in calls for c in children[path]):
            path = next((a for a in _ancestors(path) if a in calls), path)
            block = model.get_submodule(path)
        if (path, block) not in located:
            located.append((path, block))
    return located, calls, twin


def _ancestors(path: str) -> list[str]:
    """The paths above ``path``, nearest first, the model (``""``) last."""
    found = []
    while path:
        path = path.rpartition(".")[0]
        found.append(path)
    return found


def _twin_of(forward: Any, model: nn.Module, twin: nn.Module) -> Any:
    """The twin's counterpart of ``forward`` (the model, or one of its submodules)."""
    if forward is None or forward is model:
        return twin
    path = next(p for p, m in model.named_modules() if m is forward)
    return twin.get_submodule(path)
