"""LLM Compressor on autocal-converted models (extra ``autocal[llmcompressor]``).

Pinned to the stack LLM Compressor users run: llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0. autocal's core never imports
this module; this module imports llmcompressor lazily, inside the functions
that need it, so importing it without the extra installed works.

The flow (see ``docs/llmcompressor.md``)::

    from autocal.integrations import llmcompressor as autocal_lc

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
    autocal_lc.prepare(model)                        # convert every MoE block, guard, name checkpoint keys
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=autocal_lc.default_ignore(model))
    coverage = autocal_lc.oneshot(model, recipe=recipe, dataset=ds, processor=tokenizer)
    print(coverage)                                  # tokens per expert Linear, qparams present and finite
    autocal_lc.save_pretrained(model, out_dir)       # checked before writing, verified after reload

What each step guarantees:

- ``prepare`` converts with ``autocal.convert`` and checks that LLM Compressor's
  own MoE linearization (``oneshot`` calls ``linearize_moe`` on every module
  ``get_non_linearized_moes`` returns) finds nothing inside a converted block.
  It then teaches the model, through transformers' own save-time conversion
  mapping (``model._weight_conversions``), to write expert keys with the names
  the model's original checkpoint uses (Mixtral: ``block_sparse_moe.experts.{i}.w1``).
- ``default_ignore`` / ``gate_modules``: the routers autocal detected (and bare
  Linear gates of shared experts), never a list of names.
- ``oneshot`` runs ``llmcompressor.oneshot`` with every expert calibrated and
  counts the tokens each expert Linear saw while LLM Compressor's calibration
  hooks were live; ``Coverage`` fails if one saw fewer tokens than its block, or
  lacks a quantization parameter, or has one that is NaN/inf.
- ``save_pretrained`` compresses, builds the exact state dict transformers will
  write, gives unpacked views their own storage, checks the layout
  (``check_state_dict``) *before* anything is written, saves, then reloads the
  safetensors files and compares every tensor bitwise.

Modules, one per step: ``blocks`` (what autocal converted, gates), ``naming`` (checkpoint
names), ``preparation`` (``prepare``), ``tracking`` (``Coverage``), ``checkpoint``
(``save_pretrained``), ``calibration`` (``oneshot``). Everything is re-exported here, but for the
modifiers that compute a statistic once per group of expert Linears sharing an input, which import
llmcompressor as they are imported: ``gptq`` (``SharedHessianGPTQModifier``: one GPTQ Hessian, one
factorization, batched updates; the arithmetic in ``group_gptq``) and ``observers``
(``SharedObserverQuantizationModifier``: one static input observer).
"""

from .blocks import ExpertLinear, calibration_blocks, default_ignore, expert_linears, gate_modules
from .calibration import oneshot, set_calibration
from .checkpoint import (CheckpointLayout, CheckpointLayoutError, SavedCheckpoint, _state_dict_to_write,
                         check_state_dict, checkpoint_layout, install_checked_save, load_saved_state_dict,
                         save_pretrained, shared_storage_groups, unshare, verify_saved)
from .naming import AutocalExpertRenaming, _revert, checkpoint_names, install_checkpoint_names, saved_names
from .preparation import LinearizationConflict, Preparation, check_linearization, llmcompressor_moe_targets, prepare
from .tracking import Coverage, CoverageError, CoverageTracker, LinearCoverage, check_coverage, coverage

__all__ = [
    "AutocalExpertRenaming",
    "CheckpointLayout",
    "CheckpointLayoutError",
    "Coverage",
    "CoverageError",
    "CoverageTracker",
    "ExpertLinear",
    "LinearCoverage",
    "LinearizationConflict",
    "Preparation",
    "SavedCheckpoint",
    "calibration_blocks",
    "check_coverage",
    "check_linearization",
    "check_state_dict",
    "checkpoint_layout",
    "checkpoint_names",
    "coverage",
    "default_ignore",
    "expert_linears",
    "gate_modules",
    "install_checked_save",
    "install_checkpoint_names",
    "llmcompressor_moe_targets",
    "load_saved_state_dict",
    "oneshot",
    "prepare",
    "save_pretrained",
    "saved_names",
    "set_calibration",
    "shared_storage_groups",
    "unshare",
    "verify_saved",
]
