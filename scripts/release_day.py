#!/usr/bin/env python
"""Release day: which MoE model types of the installed transformers are new or changed, and do they convert?

Usage:
    python scripts/release_day.py            # list, build and run the zoo on what is new or changed
    python scripts/release_day.py --list     # only list them
    python scripts/release_day.py --update   # record the installed transformers as the last supported one

``fixtures/moe_types.json`` records, for the last supported transformers release,
every MoE model type and a hash of the modeling files its model is defined in
(``autocal.testing.zoo.modeling_sources``): of their top-level classes and
functions that mention experts or routing but not the cache or masks (the
experts, routers and MoE blocks; ``moe_code_hash``). Against the installed transformers,
a type is *new* when it is not recorded and *changed* when its hash differs.
Each one is then built tiny from ``fixtures/models/<type>.json`` and converted
with no example inputs by the zoo runner (``run_architecture``): converted,
calibration off bitwise, on within rounding, every expert seeing every token,
restore, the meta-device model. A new type without a fixture is reported with
a draft config (the type's default config with the usual tiny sizes) when one
builds and runs, to review and save as its fixture.

Exit status: 0 when every new or changed type passes, 1 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LISTING = ROOT / "fixtures" / "moe_types.json"
# Sizes of a draft fixture, for the config keys a type has (the zoo's fixtures use these).
TINY = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 8, "n_routed_experts": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2,
}


# Top-level definitions of a modeling file that make up its MoE code: the ones that mention experts or routing,
# and not the cache, attention masks or model base classes (decoder layers and models, which name their MoE
# block and router outputs).
MOE_CODE = re.compile(r"use_experts_implementation|num_experts|n_routed_experts|num_local_experts|experts?\b|"
                      r"router|top_?k")
NOT_MOE_CODE = re.compile(r"\bcache\b|past_key_values|attention_mask|position_ids|PreTrainedModel\b|GenerationMixin")
TOP_LEVEL = re.compile(r"^(?=@|class |def )", flags=re.MULTILINE)


def moe_code_hash(files: list[Path]) -> str:
    """A hash of the top-level classes and functions of ``files`` that mention experts or routing and not the
    cache or masks: the experts, routers and MoE blocks. An edit elsewhere (attention, the decoder layer's
    cache argument) does not flag the type; an MoE living in a decoder layer (gemma4) is not hashed."""
    digest = hashlib.sha256()
    for path in files:
        blocks = TOP_LEVEL.split(path.read_text(encoding="utf-8"))[1:]
        for block in blocks:
            if MOE_CODE.search(block) and not NOT_MOE_CODE.search(block):
                digest.update(block.encode())
    return digest.hexdigest()[:16]


def current_listing() -> dict:
    import transformers

    from autocal.testing import zoo

    hashes = {model_type: moe_code_hash(files) for model_type, files in zoo.modeling_sources().items()}
    return {"transformers": transformers.__version__, "types": hashes}


def differences(recorded: dict, current: dict) -> tuple[list[str], list[str], list[str]]:
    """(new, changed, gone) model types of ``current`` against ``recorded``."""
    old, now = recorded["types"], current["types"]
    new = sorted(set(now) - set(old))
    changed = sorted(t for t in set(now) & set(old) if now[t] != old[t])
    return new, changed, sorted(set(old) - set(now))


def draft_config(model_type: str) -> dict | None:
    """The type's default config with the ``TINY`` sizes it has, if a model of it builds and runs; else None."""
    import torch
    import transformers

    from autocal.testing import zoo

    defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    config = {k: v for k, v in TINY.items() if k in defaults}
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        try:
            model = getattr(transformers, auto).from_config(transformers.AutoConfig.for_model(model_type, **config))
            forward = zoo.forward_module(model.eval())
            with torch.no_grad():
                forward(**zoo.example_inputs(model))
            return {"model_type": model_type, "auto_class": auto, "config": config,
                    "notes": "draft made by scripts/release_day.py: review it"}
        except Exception:  # this auto class, or these sizes, do not build or run it
            continue
    return None


def main(args: list[str]) -> int:
    from autocal.testing import zoo

    current = current_listing()
    if "--update" in args:
        LISTING.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(current['types'])} MoE model types of transformers {current['transformers']}")
        return 0
    recorded = json.loads(LISTING.read_text())
    new, changed, gone = differences(recorded, current)
    print(f"transformers {current['transformers']} against {recorded['transformers']} (the last supported): "
          f"{len(current['types'])} MoE model types; new: {', '.join(new) or 'none'}; "
          f"changed: {', '.join(changed) or 'none'}; gone: {', '.join(gone) or 'none'}")
    if "--list" in args:
        return 0
    from autocal.testing.zoo_runner import run_architecture

    fixtures, failed = set(zoo.fixture_names()), []
    for name in new + changed:
        if name not in fixtures:
            draft = draft_config(name)
            failed.append(name)
            print(f"{name:<26}no fixture: " + (f"a draft that builds and runs:\n{json.dumps(draft, indent=2)}"
                                              if draft else "its default config with tiny sizes does not build; "
                                                            "write fixtures/models/%s.json by hand" % name))
            continue
        result = run_architecture(name, given_inputs=False)
        if not result.passed:
            failed.append(name)
        detail = result.unbuildable or result.failure or f"coverage {result.experts_covered}"
        print(f"{name:<26}{'pass' if result.passed else 'FAIL':<7}{result.seconds:>7.2f}s  {detail}", flush=True)
    print(f"{len(new + changed) - len(failed)} of {len(new + changed)} new or changed types pass"
          + (f"; to do: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
