"""A griffe extension for the API pages: show docstring examples as code.

The docstrings of ``mlaan_func`` carry doctest examples (``>>>`` lines and their expected
output) in plain prose, where pytest runs them. Markdown would read ``>>>`` as nested block
quotes and ``[...]`` outputs as reference links; this wraps every run of doctest lines in
a fenced ``pycon`` block before mkdocstrings renders it. The source files are not touched.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each doctest example run (from a ``>>>`` line to the next blank line) in a
    ``pycon`` fence, keeping its indentation."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence the doctest examples of every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D401
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
