"""The import contract between autocal's stages: each imports only the stages below it.

trace < detect < synthesize < rules (the table) and sharing (facts of the synthesized graphs) < the api
facade < explain, cli and integrations, with errors, numerics (and the expert Linear calls it makes), the
override registry and the token counters beneath them all. An
import of a higher stage, at module level or inside a function, fails here, naming the file and line.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autocal"

# Lower rank: lower in the stack. A module may import its own stage and the stages of lower rank.
RANK = {
    "errors": 0, "numerics": 1, "linear_calls": 1, "registry": 2, "coverage": 3,
    "trace": 4, "detect": 5, "synthesize": 6, "verify": 7, "rules": 8, "sharing": 8, "unconverted": 8, "api": 9,
    "explain": 10, "__init__": 10, "integrations": 11, "testing": 12, "cli": 13, "__main__": 14,
}  # ``__init__``: the package itself, which re-exports the facade (api and explain)


def _stage(parts: list[str]) -> str:
    """``["autocal", "detect", "x"]`` -> ``detect``; ``["autocal", "api"]`` -> ``api``."""
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(source: str, here: list[str]) -> list[tuple[int, list[str]]]:
    """``(line, dotted parts)`` of every autocal module the module ``here`` imports (relative imports resolved)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:-node.level] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            found += [(node.lineno, module + [alias.name]) for alias in node.names] if len(module) == 1 else [
                (node.lineno, module)]
    return [(line, parts) for line, parts in found if parts[0] == "autocal"]


def upward_imports(source: str, relative: str) -> list[str]:
    """``file:line`` of each import in ``source`` (the module at ``relative``, under autocal/) of a higher stage."""
    here = ["autocal", *Path(relative).with_suffix("").parts]
    stage, found = _stage(here), []
    for line, parts in _imports(source, here):
        target = _stage(parts)
        if target in RANK and target != stage and RANK[target] > RANK[stage]:
            found.append(f"autocal/{relative}:{line} ({stage}) imports {'.'.join(parts)} ({target})")
    return found


def test_every_module_has_a_stage():
    stages = {_stage(["autocal", *p.relative_to(PACKAGE).with_suffix("").parts]) for p in _modules()}
    assert stages <= set(RANK), f"stages without a rank: {sorted(stages - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    assert upward_imports(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE))) == []


def test_the_contract_catches_an_upward_import():
    """Relative imports are resolved, function-level ones read too: detect importing synthesize or api fails."""
    source = "from ..synthesize.ops import run_unrouted\nfrom .. import errors\n\n\ndef f():\n    from .. import api\n"
    found = upward_imports(source, "detect/probe.py")
    assert len(found) == 2 and "(synthesize)" in found[0] and "(api)" in found[1]
    assert upward_imports("from .synthesize.ops import run_unrouted\n", "rules.py") == [], "the table sits above"


def test_no_module_over_400_lines_outside_testing():
    large = [f"{p.relative_to(PACKAGE.parent)} ({len(p.read_text().splitlines())})" for p in _modules()
             if "testing" not in p.parts and len(p.read_text().splitlines()) > 400]
    assert large == []
