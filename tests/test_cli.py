"""The command line: autocal explain CONFIG, autocal demo."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "autocal", *args], capture_output=True, text=True, cwd=ROOT)


def test_explain_full_size_deepseek_v3_config_on_meta():
    result = _run("explain", "fixtures/configs/deepseek_v3_full.json")
    assert result.returncode == 0, result.stderr
    assert "DeepseekV3MoE  ×58" in result.stdout
    assert "top_k:           8 of 256" in result.stdout and "sigmoid → topk" in result.stdout
    assert "┌" not in result.stdout, "piped output is plain text, not a table"
    assert "meta device" in result.stdout


def test_explain_json(tmp_path):
    config = json.loads((ROOT / "fixtures/models/qwen3_moe.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": config["model_type"], **config["config"]}))
    result = _run("explain", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    block = report["blocks"][0]
    assert block["structure"]["experts"]["num_experts"] == config["config"]["num_local_experts"]
    import torch
    import transformers

    import autocal

    assert report["versions"] == {"autocal": autocal.__version__, "torch": torch.__version__,
                                  "transformers": transformers.__version__}
    assert block["how"] == "synthesized" and "path" not in block, "how autocal built it, beside paths in the model"
    assert block["paths"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    sources = [*block["structure"]["router"]["sources"].values(), *block["structure"]["experts"]["sources"].values()]
    assert sources and all(re.fullmatch(r"transformers/models/qwen3_moe/modeling_qwen3_moe\.py:\d+", s)
                           for s in sources), sources
    assert "site-packages" not in result.stdout and str(Path(transformers.__file__).parent) not in result.stdout


def test_explain_missing_and_malformed_config(tmp_path):
    missing = _run("explain", str(tmp_path / "nowhere.json"))
    assert missing.returncode == 2 and "nowhere.json" in missing.stderr
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    malformed = _run("explain", str(bad))
    assert malformed.returncode == 2 and str(bad) in malformed.stderr


def test_explain_model_without_moe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64}))
    result = _run("explain", str(tmp_path))
    assert result.returncode == 1 and "no MoE block" in result.stderr


def test_demo_runs_and_checks_equivalence():
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    assert "bitwise equal" in result.stdout
