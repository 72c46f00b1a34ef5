"""The core and the kernels name no architecture: plugins do.

Scans every Python file of ``corept/`` and ``kernels/corept_kernels`` token by token and fails on
an architecture or model-family name in code, strings or comments; docstrings may use one as an
example ("e.g. Gemma's 1 + w norm"), since they describe, and the rule is about behaviour.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = [REPO / "corept", REPO / "kernels" / "corept_kernels"]
# llama.cpp (its llama-cli, Ollama, the gguf package's LlamaFileType) are runtimes and file formats
# that GGUF files are written for, not architectures
NAMES = re.compile(r"(?<!o)llama(?![.]cpp|-cli|filetype)|mistral|mixtral|qwen|gemma|granite|olmo|smollm|cohere|falcon|deepseek|phi[-_]?\d",
                   re.IGNORECASE)


def _docstring_lines(source: str) -> set[int]:
    """Lines of string statements: docstrings of modules, classes and functions, and the attribute
    docstrings that follow an assignment."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def violations(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    docs = _docstring_lines(source)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT) and tok.start[0] not in docs:
            if NAMES.search(tok.string):
                found.append(f"{path.relative_to(REPO)}:{tok.start[0]}: {tok.string[:80]}")
    return found


@pytest.mark.parametrize("root", ROOTS, ids=lambda p: p.name)
def test_no_architecture_names_outside_docstrings(root):
    found = [v for path in sorted(root.rglob("*.py")) for v in violations(path)]
    assert not found, "architecture names in code (declare them in a plugin instead):\n" + "\n".join(found)


def test_the_scan_sees_code_strings_and_comments(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""A Llama-like example is fine here."""\nX = "gemma"  # qwen\nllama_norm = 1\n'
                      'Y = "for llama.cpp and Ollama"\n')
    got = [v.rsplit(": ", 1)[1] for v in violations_in(sample, tmp_path)]
    assert got == ['"gemma"', "# qwen", "llama_norm"]


def violations_in(path: Path, root: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, root
    try:
        return violations(path)
    finally:
        REPO = saved
