"""Every ```python block in docs/*.md runs.

The blocks of one page run in order as one script (a later block may use what an earlier
one defined), in a fresh interpreter from the repository root. A block preceded by the
line ``<!-- no-run -->`` is shown but not run (e.g. commands that need a GPU or torchrun).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?P<marker><!--\s*no-run\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def runnable_blocks(text: str) -> list[str]:
    return [m.group("code") for m in BLOCK.finditer(text) if not m.group("marker")]


PAGES = sorted(p for p in DOCS.glob("*.md") if runnable_blocks(p.read_text()))


def test_block_extraction_honours_no_run():
    text = "```python\na = 1\n```\n<!-- no-run -->\n```python\nraise SystemExit(1)\n```\n"
    assert runnable_blocks(text) == ["a = 1\n"]


def test_there_are_documentation_examples():
    assert len(PAGES) >= 3, [p.name for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page, tmp_path):
    blocks = runnable_blocks(page.read_text())
    script = tmp_path / f"{page.stem}_examples.py"
    script.write_text("\n\n".join(f"# --- block {i + 1} of {page.name}\n{b}" for i, b in enumerate(blocks)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{page.name}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
