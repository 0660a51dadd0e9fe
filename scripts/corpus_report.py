"""Run every block of the corpus (autocal/testing/corpus.py) through autocal and print what happened.

    python scripts/corpus_report.py                 # print the table (markdown)
    python scripts/corpus_report.py sparsemixer     # or some entries
    python scripts/corpus_report.py --write         # also regenerate docs/corpus.md (all entries)

Each cell is one check (see autocal.testing.corpus.CHECKS): ``pass``; the kind of the
AutocalError raised; ``silent`` (returned with a block unconverted or unreported);
``wrong`` (a wrong output, coverage or k); ``raw <type>`` (an exception that is not an
AutocalError). The first line of each failure follows the table.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = ROOT / "docs" / "corpus.md"
INTRO = """# Corpus: MoE code as people write it

<!-- auto-generated — regenerate with: python scripts/corpus_report.py --write -->

MoE blocks written in this project in the styles of public code outside transformers: reference inference code
of open-weight MoE models, training frameworks, research libraries, remote code of hub models
(`autocal/testing/corpus.py`; none is copied from anywhere). Each is a correct top-k MoE: `tests/test_corpus.py`
checks each block's output against a dense reference written there. Patterns are the numbers of issue 19's list:
1 custom Linear experts, with an extra parameter, or nested; 2 packed weights gathered and contracted by einsum;
3 rows sorted by expert; 4 every expert on every token, input scaled by a detached score; 5 capacity-based einsum
dispatch, two-level gating; 6 a decode branch; 7 per-expert post-processing; 8 zero/identity, tuple-returning,
modality, expert-id, Megatron and sparsemixer styles.

Checks, each on 1, 10 and 9 tokens: **synthesize** the block (for the decoder-layer entries: the MoE block inside);
**convert** a model holding it, without and with **example** inputs; **mixed**: convert a model that also holds a
block autocal converts (a toy Qwen3-MoE block); **explain k**: `explain` lists the block with its true k. A pass
means calibration off is bitwise the original, calibration on is within `autocal.verify` tolerances, and every
expert Linear sees every token. Otherwise the cell says the error kind, `silent` (returned, block unconverted or
unlisted), `wrong` (a wrong output, coverage or k) or `raw` and the exception type (not an `AutocalError`).
The modality entry, whose forward needs `token_type_ids`, gets example inputs in every check (`synthesize(block,
example_inputs=...)` too), and each of its experts must see every token of its own modality: the tokens reaching
its expert set (docs/how-it-works.md, *several expert sets*).
`tests/test_corpus.py` holds the same results as strict xfails (`KNOWN_FAILURES`).

Regenerate:
"""


def _readable(cell: str) -> str:
    """Paths from the repository root, a raw exception's message cut to its first sentence."""
    cell = cell.replace(str(ROOT) + "/", "")
    return cell.split(". ", 1)[0] if cell.startswith("raw ") else cell


def _short(cell: str) -> str:
    return cell.split(":", 1)[0] if cell != "pass" else cell


def run(names: list[str]) -> tuple[list[str], list[str]]:
    """Markdown table lines and failure detail lines, printing each row as it comes."""
    from autocal.testing.corpus import CHECKS, ENTRIES, outcome

    header = ["entry", "style", "patterns", *CHECKS]
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    details, passed = [], 0
    print(table[0], table[1], sep="\n", flush=True)
    for name in names:
        entry = ENTRIES[name]
        started = time.perf_counter()
        cells = [_readable(outcome(check, entry)) for check in CHECKS.values()]
        passed += all(cell == "pass" for cell in cells)
        details += [f"- `{name}` {check}: {cell}" for check, cell in zip(CHECKS, cells) if cell != "pass"]
        row = [f"`{name}`", entry.style, ", ".join(map(str, entry.patterns)) or "—", *map(_short, cells)]
        table.append("| " + " | ".join(row) + " |")
        print(table[-1], f"<!-- {time.perf_counter() - started:.1f} s -->", flush=True)
    summary = f"{passed} of {len(names)} entries pass every check."
    print(summary, *details, sep="\n")
    return [*table, "", summary], details


def main(argv: list[str]) -> None:
    from autocal.testing.corpus import ENTRIES

    warnings.simplefilter("ignore")
    write = "--write" in argv
    names = [a for a in argv if a != "--write"] or list(ENTRIES)
    if write and len(names) != len(ENTRIES):
        raise SystemExit("--write runs every entry: give no names")
    table, details = run(names)
    if write:
        PAGE.write_text("\n".join([INTRO, "<!-- skip -->", "```bash", "python scripts/corpus_report.py --write",
                                   "```", "", *table, "", "## Failures", "",
                                   *(line.replace("|", "\\|") for line in details), ""]))
        print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
