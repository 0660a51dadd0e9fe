"""scripts/release_day.py: what it counts as a new or changed MoE model type."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("release_day", ROOT / "scripts" / "release_day.py")
release_day = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(release_day)

MODELING = '''
class ToyAttention(nn.Module):
    def forward(self, hidden_states, attention_mask, cache=None):
        return hidden_states


class ToyExperts(nn.Module):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states * 2


class ToyPreTrainedModel(PreTrainedModel):
    _can_record_outputs = {"router_logits": ToyRouter}
'''


def _hash(tmp_path, text):
    path = tmp_path / "modeling_toy.py"
    path.write_text(text)
    return release_day.moe_code_hash([path])


def test_only_an_edit_of_the_moe_code_changes_a_types_hash(tmp_path):
    original = _hash(tmp_path, MODELING)
    assert _hash(tmp_path, MODELING.replace("return hidden_states\n", "return hidden_states + 1\n", 1)) == original
    assert _hash(tmp_path, MODELING.replace("ToyRouter}", "ToyGate}")) == original
    assert _hash(tmp_path, MODELING.replace("hidden_states * 2", "hidden_states * 3")) != original


def test_new_changed_and_gone_types():
    recorded = {"transformers": "1.0", "types": {"a": "1", "b": "2", "c": "3"}}
    current = {"transformers": "1.1", "types": {"a": "1", "b": "9", "d": "4"}}
    assert release_day.differences(recorded, current) == (["d"], ["b"], ["c"])


def test_every_recorded_type_has_a_fixture():
    recorded = json.loads(release_day.LISTING.read_text())["types"]
    fixtures = {p.stem for p in (ROOT / "fixtures" / "models").glob("*.json")}
    assert recorded and not set(recorded) - fixtures
