"""The launch counter (bench/launch_count.py) on the tiny Llama: what one decoder layer issues.

Counts, not times: a corept layer must issue fewer device launches than peft's, one rank-add
launch per shared-input group in forward and per LoRA linear in backward, and no host
synchronisation (``.item()`` and friends) at all.
"""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts Triton launches through the interpreter (TRITON_INTERPRET=1)")


TOKENS = 32  # launches do not depend on the token count; the interpreter's time does


@pytest.fixture(scope="module")
def counts():
    """Counts at 1 and 2 layers, at 32 tokens with the no-grad fused-path threshold lowered to match
    (at the tool's 128 the same launches are issued; the interpreter takes ~4x longer)."""
    import importlib.util
    from pathlib import Path

    from corept.lora import fast_path

    path = Path(__file__).resolve().parent.parent / "launch_count.py"
    spec = importlib.util.spec_from_file_location("corept_bench_test_launch_count", path)
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_path, "SMALL_NO_GRAD_TOKENS", TOKENS)
        return {v: lc.per_layer(v, layers=1, tokens=TOKENS) for v in ("corept", "hf")}


def test_corept_layer_issues_fewer_launches_than_peft(counts):
    corept, hf = counts["corept"], counts["hf"]
    assert corept["corept_applied"], "corept patched nothing: the count would be peft's"
    assert 0 < corept["per_layer"] < hf["per_layer"], (corept["per_layer"], hf["per_layer"])
    assert hf["per_layer_triton"] == 0 and corept["per_layer_triton"] > 0


def test_rank_adds_per_layer(counts):
    ops = counts["corept"]["per_layer_by_op"]
    # Forward and checkpointing's recomputed forward: the q/k/v and gate/up groups one launch each,
    # o and down one each; backward: one per LoRA linear (7).
    assert ops["triton::_rank_add_group_kernel"] == 2 * 2
    assert ops["triton::_rank_add_kernel"] == 2 * 2 + 7
    assert ops["aten::mm (fp32 out)"] > 0


def test_no_host_sync_in_a_layer(counts):
    for v in ("corept", "hf"):
        syncs = {op: n for op, n in counts[v]["per_layer_by_op"].items()
                 if op in ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")}
        assert not syncs, (v, syncs)
