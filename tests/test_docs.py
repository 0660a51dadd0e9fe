"""Every example in the docs runs, and the reference cannot drift from the code.

- Each ```python block of README.md and docs/**/*.md runs; the blocks of one page
  run in order, in one namespace. A block with ``>>>`` prompts runs as a doctest
  (ELLIPSIS, NORMALIZE_WHITESPACE), so the output it shows is checked; any other
  block runs as a script and checks itself with ``assert``.
- A block that must not run has a ``<!-- skip -->`` line right before it; only
  shell blocks (install lines, commands) may be skipped, and every non-python
  block under docs/ must be one of those. A python block that needs an optional
  extra has ``<!-- requires: MODULE -->`` before it and runs where MODULE imports
  (scripts/test.sh runs the docs in the LLM Compressor environment too).
- LLM Compressor's log lines go to stderr, not into the examples' output: they are
  progress reports, not what an example shows.
- The docstring examples of every object the reference renders (``::: dotted.path``)
  run too, in their module's namespace plus ``torch`` and ``autocal``; the reference
  renders every name in ``autocal.__all__``, and its error-kind table matches
  ``autocal.errors.KINDS``.
- mkdocs.yml lists every page under docs/ (and nothing else but the optional
  pages that scripts/docs.sh leaves out when they are missing).

Regenerate the shown output of failing ``>>>`` examples in place:
``AUTOCAL_ACCEPT=1 pytest tests/test_docs.py``, then review the diff (replace
machine-specific parts, such as absolute paths, by ``...``).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import re
import sys
import textwrap
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import autocal
from autocal import registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SKIP = "<!-- skip -->"
REQUIRES = re.compile(r"^<!-- requires: ([\w.]+) -->$")
SHELL = {"bash", "sh", "shell", "console"}
# Pages written elsewhere that scripts/docs.sh drops from the nav while they do not exist.
OPTIONAL_PAGES = {"llmcompressor.md", "benchmarks.md"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
ACCEPT = os.environ.get("AUTOCAL_ACCEPT") == "1"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    first_line: int  # 1-based line of the block's first code line
    indent: str  # of the fence (a block inside a list item), removed from the code
    lang: str
    code: str
    skipped: bool
    requires: str | None = None  # a module the block needs (an optional extra)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.first_line}"

    @property
    def is_doctest(self) -> bool:
        return any(line.lstrip().startswith(">>>") for line in self.code.splitlines())


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with the marker line before each."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: code block never closed"
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        code = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
        requires = REQUIRES.match(before)
        blocks.append(Block(page, i + 2, indent, lang.lower(), code, before == SKIP, requires and requires[1]))
        i = end + 1
    return blocks


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- running a page --------------------------------------------------------------------------------


class _Runner(doctest.DocTestRunner):
    """Collects the output of failing examples (for AUTOCAL_ACCEPT) besides reporting them."""

    def __init__(self) -> None:
        super().__init__(optionflags=FLAGS)
        self.mismatches: list[tuple[doctest.Example, str]] = []

    def report_failure(self, out, test, example, got):
        self.mismatches.append((example, got))
        super().report_failure(out, test, example, got)


def _run_doctest(block: Block, namespace: dict) -> list[tuple[Block, doctest.Example, str]]:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, block.where, str(block.page), block.first_line - 1)
    test.globs = namespace  # shared, not the copy doctest makes: functions see later rebindings
    runner, report = _Runner(), []
    result = runner.run(test, out=report.append, clear_globs=False)
    if result.failed and not (ACCEPT and len(runner.mismatches) == result.failed):
        pytest.fail(f"{block.where}: {result.failed} example(s) failed\n" + "".join(report), pytrace=False)
    return [(block, example, got) for example, got in runner.mismatches]


def _accept(page: Path, mismatches: list[tuple[Block, doctest.Example, str]]) -> None:
    """Write the output each failing example printed in place of what the page showed."""
    lines = page.read_text().splitlines()
    for block, example, got in sorted(mismatches, key=lambda m: -(m[0].first_line + m[1].lineno)):
        start = block.first_line - 1 + example.lineno + example.source.count("\n")
        indent = block.indent + " " * example.indent
        new = [indent + (line.rstrip() or "<BLANKLINE>") for line in got.rstrip("\n").splitlines()]
        lines[start:start + example.want.count("\n")] = new
    page.write_text("\n".join(lines) + "\n")


@pytest.fixture
def isolated():
    """Each page starts from the same state: seeded RNG, its own namespace, the override table as it was."""
    overrides = dict(registry._OVERRIDES)
    cwd = os.getcwd()
    torch.manual_seed(0)
    os.chdir(ROOT)
    try:
        _llmcompressor_logs_to_stderr()
        yield {"__name__": "__docs__"}
    finally:
        os.chdir(cwd)
        registry._OVERRIDES.clear()
        registry._OVERRIDES.update(overrides)


def _llmcompressor_logs_to_stderr() -> None:
    """LLM Compressor configures loguru when imported, to log to the ``sys.stdout`` of that moment: imported
    inside an example, its log lines would be taken for the example's output. Imported here, they go to stderr."""
    if "llmcompressor" not in sys.modules and importlib.util.find_spec("llmcompressor") is not None:
        with redirect_stdout(sys.stderr):
            importlib.import_module("llmcompressor")


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "python" for b in code_blocks(p))], ids=_page_id)
def test_page_examples_run(page: Path, isolated: dict) -> None:
    mismatches = []
    for block in code_blocks(page):
        if block.lang != "python" or block.skipped or not _importable(block.requires):
            continue
        if block.is_doctest:
            mismatches += _run_doctest(block, isolated)
        else:  # line numbers in tracebacks are the page's own
            exec(compile("\n" * (block.first_line - 1) + block.code, str(page), "exec"), isolated)
    if mismatches:
        _accept(page, mismatches)
        pytest.skip(f"AUTOCAL_ACCEPT: rewrote {len(mismatches)} example output(s) in {_page_id(page)}")


def _importable(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("page", [p for p in PAGES if p.is_relative_to(DOCS)], ids=_page_id)
def test_blocks_run_or_are_skipped_shell(page: Path) -> None:
    for block in code_blocks(page):
        if block.lang == "python":
            assert not block.skipped, f"{block.where}: python blocks always run; {SKIP} is for shell lines"
        else:
            assert block.lang in SHELL and block.skipped, (
                f"{block.where}: a ```{block.lang} block never runs: make it a ```python block "
                f"(with >>> to show output), or a shell block with {SKIP} on the line before"
            )


# -- the reference ---------------------------------------------------------------------------------


def _reference_targets() -> dict[str, object]:
    """Objects rendered by mkdocstrings (``::: dotted.path``) anywhere under docs/."""
    targets = {}
    for page in DOCS.rglob("*.md"):
        for path in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M):
            targets[path] = _resolve(path)
    return targets


def _resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(path)


def test_reference_renders_every_public_name() -> None:
    rendered = _reference_targets()
    ids = {id(obj) for obj in rendered.values()}
    for name in autocal.__all__:
        obj = getattr(autocal, name)
        if inspect.ismodule(obj):
            assert any(p.startswith(obj.__name__ + ".") for p in rendered), f"no part of autocal.{name} rendered"
        else:
            assert id(obj) in ids, f"autocal.{name} is public but docs/api.md does not render it"


@pytest.mark.parametrize("path", sorted(_reference_targets()))
def test_reference_docstring_examples_run(path: str) -> None:
    obj = _resolve(path)
    module = inspect.getmodule(obj)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    globs = {"torch": torch, "autocal": autocal, **vars(module)}  # as numpy's doctests have `np`
    for test in finder.find(obj, path, module=module, globs=globs):
        runner.run(test, out=report.append)
    assert not runner.failures, "".join(report)


def test_error_kind_table_matches_the_code() -> None:
    api = (DOCS / "api.md").read_text()
    for kind, meaning in autocal.errors.KINDS.items():
        assert (DOCS / "errors" / f"{kind}.md").is_file(), f"no page docs/errors/{kind}.md"
        row = f"| [`{kind}`](errors/{kind}.md) | {meaning} |"
        assert row in api, f"docs/api.md lacks the row {row}"
    rows = re.findall(r"^\| \[`([\w-]+)`\]\(errors/", api, re.M)
    assert sorted(rows) == sorted(autocal.errors.KINDS), "docs/api.md lists error kinds the code does not have"


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return [p for item in nav for p in _nav_pages(item)]


def test_nav_lists_every_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert sorted(pages - set(nav)) == [], "pages missing from the nav in mkdocs.yml"
    assert sorted(set(nav) - pages - OPTIONAL_PAGES) == [], "nav entries without a page"
