"""Golden texts: a test's output compared with a file of the checkout, rewritten with ``AUTOCAL_ACCEPT=1``.

The file's first line says how to regenerate it; the rest is the text. A
golden text must hold nothing that changes between machines or versions the
tests run on (a figure of the CPU's rounding, a line number of transformers).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> _ = path.write_text("# regenerate with: …\\nsome text\\n")
    >>> compare_golden(path, "some text", "…")
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ACCEPT", "compare_golden"]

ACCEPT = "AUTOCAL_ACCEPT"


def compare_golden(path: Path, text: str, regenerate: str) -> None:
    """Assert ``text`` is the golden text at ``path``; with ``AUTOCAL_ACCEPT`` set, write it there first.

    ``regenerate``: the command that rewrites the file, written on its first line.
    """
    if os.environ.get(ACCEPT):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# auto-generated — regenerate with: {ACCEPT}=1 {regenerate}\n{text}\n")
    assert path.exists(), f"no golden text {path}: run {ACCEPT}=1 {regenerate}"
    assert text + "\n" == path.read_text().split("\n", 1)[1]
