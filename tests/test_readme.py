"""README's Python snippets run as written (each in a fresh namespace), and its command lines name
options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_snippets():
    assert len(SNIPPETS) >= 3
    assert any("block_table" in s and "decode_attention" in s and "append_kv" in s for s in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "readme"})


def test_readme_decode_snippet_reads_what_append_wrote():
    """Not just shapes: the decode in the first snippet equals the oracle over the appended keys."""
    import torch

    from kvkernels import reference
    ns: dict = {}
    exec(compile(SNIPPETS[0], "README.md snippet 0", "exec"), ns)
    ref, _ = reference.decode_attention(ns["q"], ns["k"], ns["v"], ns["cache_seqlens"])
    torch.testing.assert_close(ns["out"], ref.to(ns["out"].dtype), atol=2e-3, rtol=2e-3)
