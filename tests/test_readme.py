"""The README's Python snippets of the "Use" section (the ops and modules) run as written: each ```python
block in a fresh namespace, on the CPU when there is no GPU (the reference backend keeps them fast under the
Triton interpreter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SECTION = "Use"


def snippets(section: str) -> list:
    """``pytest.param(code, first line number)`` per block of the ``## section`` (its subsections included),
    named after the heading above it."""
    text = README.read_text()
    params = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()]
        if re.findall(r"^## (.+)$", before, re.M)[-1] != section:
            continue
        heading = re.findall(r"^#+ (.+)$", before, re.M)[-1]
        line = before.count("\n") + 2
        params.append(pytest.param(match.group(1), line, id=f"{heading} (line {line})"))
    return params


SNIPPETS = snippets(SECTION)


def test_the_use_section_has_its_snippets():
    assert len(SNIPPETS) == 4  # window attention, Mix-FFN, OCR pooling, GCC assignment


@pytest.mark.parametrize("code, line", SNIPPETS)
def test_readme_snippet_runs(monkeypatch, code, line):
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    torch.manual_seed(0)
    exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "readme_snippet"})
