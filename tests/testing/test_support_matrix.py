"""The README's support matrix is generated from the installed plugins' declarations and is current."""
from pathlib import Path

import pytest

from corept.registry import support_matrix as sm
from corept.registry.declarations import COMPONENTS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_support_matrix_is_current():
    current = sm.current_block(README)
    assert current is not None, f"README.md lacks the {sm.START} / {sm.END} markers"
    assert current == sm.block(), ("README.md's support matrix is stale: run "
                                   "`PYTHONPATH=.build/all .venv/bin/python -P -m corept support-matrix --write README.md`")


def test_matrix_has_a_row_per_declared_architecture_and_a_cell_per_component():
    table = sm.render()
    rows = sm.rows()
    assert {r[0] for r in rows} >= {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text"}
    for model_type, plugin, arch, _ in rows:
        line = next(l for l in table.splitlines() if l.startswith(f"| `{model_type}` | {plugin} |"))
        assert line.count("|") == len(COMPONENTS) + 5
    moe = next(r[2] for r in rows if r[0] == "qwen3_moe")
    assert sm.component_cell(moe, "mlp") == "transformers"  # declared: experts stay HF's
    gemma2 = next(r[2] for r in rows if r[0] == "gemma2")
    assert sm.component_cell(gemma2, "attention") == "varlen_attention; HF eager (forced) when padded"
    gpt_oss = next(r[2] for r in rows if r[0] == "gpt_oss")  # no SDPA in transformers (sinks): eager
    assert sm.component_cell(gpt_oss, "attention") == "varlen_attention; HF eager when padded"
    llama = next(r[2] for r in rows if r[0] == "llama")
    assert sm.component_cell(llama, "attention") == "HF sdpa; varlen_attention when packed"
    assert "attn_softcap=config.attn_logit_softcapping" in sm.quirks_cell(gemma2)


def test_check_detects_a_stale_block(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{sm.START}\n| old |\n{sm.END}\nrest\n")
    assert sm.current_block(stale) != sm.block()
    assert sm.write(stale) is True
    assert sm.current_block(stale) == sm.block() and stale.read_text().startswith("intro\n")
    assert sm.write(stale) is False
    with pytest.raises(ValueError):
        (tmp_path / "bare.md").write_text("no markers")
        sm.write(tmp_path / "bare.md")
