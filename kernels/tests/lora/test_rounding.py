"""The fused LoRA paths round where peft rounds, and bound their adapter-dtype transients.

* bf16 model, fp32 adapters (peft's default): corept rounds at peft's points (the gated
  activation's, the adapter branch added in fp32 or, on an NF4 base, rounded first as peft's
  ``Linear4bit`` does, ``dx`` accumulated in autograd's order) from values equal to peft's fp32
  ones to fp32 precision (bf16 operands split in hi/lo parts, ``corept_kernels.lora.branch``).
  So its outputs and input gradient are peft's but for rare one-ulp flips
  (:func:`lora_helpers.assert_rounding_twin`); moving a rounding point or dropping the ``lo``
  parts fails that check (the controls below).
* fp32 copies of ``[N, F]`` activations are made over row chunks of at most ``CHUNK_BYTES``.
"""
from __future__ import annotations

import pytest
import torch
from lora_helpers import (H, INTER, MLP, OUT_WIDTHS, QKV, TARGETS, TOKENS, TWIN_GRAD_REL_L2, TWIN_MISMATCH,
                          TWIN_REL_L2, TinyAttnProj, TinyMLP, assert_rounding_twin, case, layers, lora_params, peftify,
                          quantize_nf4, rounding_twin_stats, run, tiny)
from torch.utils._python_dispatch import TorchDispatchMode

import corept_kernels.lora.autograd as la
import corept_kernels.lora.branch as lb
import corept_kernels.lora.mlp as lm
import corept_kernels.lora.chunks as chunks

CASES = [("mlp", "swiglu", False), ("mlp", "geglu_tanh", False), ("mlp", "geglu", False), ("qkv", None, False),
         ("o", None, False), ("mlp", "swiglu", True), ("qkv", None, True)]


def _model(kind, activation, nf4):
    if not nf4:
        model, targets = tiny(kind, activation)
        return peftify(model.to(torch.bfloat16), targets), targets
    names = MLP if kind == "mlp" else QKV
    model = quantize_nf4(TinyMLP() if kind == "mlp" else TinyAttnProj(), names, torch.bfloat16)
    return peftify(model, names), names


def _inputs(kind, seed=3):
    g = torch.Generator().manual_seed(seed)
    width = OUT_WIDTHS[kind]
    x = torch.randn(*TOKENS, 48 if kind == "o" else H, generator=g).bfloat16()
    return x, [torch.randn(*TOKENS, w, generator=g).bfloat16() for w in width]


def _ours_and_peft(kind, activation, nf4):
    pm, _ = _model(kind, activation, nf4)
    peft_fn, ours_fn, _, mods = case(kind, pm, activation or "swiglu")
    assert {p.dtype for p in lora_params(mods)} == {torch.float32}
    x, dys = _inputs(kind)
    params = lora_params(mods)
    return run(ours_fn, x, dys, params), run(peft_fn, x, dys, params)


@pytest.mark.parametrize("kind,activation,nf4", CASES,
                         ids=[f"{k}-{a or 'lin'}{'-nf4' if q else ''}" for k, a, q in CASES])
def test_bf16_fp32_adapters_follow_peft_rounding(kind, activation, nf4):
    ours, theirs = _ours_and_peft(kind, activation, nf4)
    for i, (a, b) in enumerate(zip(ours[0] + ours[1][:1], theirs[0] + theirs[1][:1])):
        assert a.dtype == b.dtype == torch.bfloat16
        assert_rounding_twin(a, b, f"output/x.grad {i}")
    for a, b in zip(ours[1][1:], theirs[1][1:]):  # adapter grads: fp32, downstream of the bf16 flips
        assert a.dtype == b.dtype == torch.float32
        assert rounding_twin_stats(a, b)[1] <= TWIN_GRAD_REL_L2


def _without_lo_parts(monkeypatch):
    def hi_only(t, dim, dtype=torch.bfloat16):
        hi = t.to(dtype)
        return torch.cat([hi, torch.zeros_like(hi)], dim)

    monkeypatch.setattr(lb, "split", hi_only)


def _branch_rounded_first(monkeypatch):
    one, group = lb.add_branch_, lb.add_branches_
    monkeypatch.setattr(lb, "add_branch_", lambda y, xa, B, s, four_bit: one(y, xa, B, s, True))
    monkeypatch.setattr(lb, "add_branches_", lambda ys, xas, Bs, ss, four_bit: group(ys, xas, Bs, ss, True))


def _rank_add_rounded_once(monkeypatch):
    rank_add = lb.rank_add_
    monkeypatch.setattr(lb, "rank_add_", lambda y, u, v, s, round_first: rank_add(y, u, v, s, False))


@pytest.mark.parametrize("defect", [_without_lo_parts, _branch_rounded_first, _rank_add_rounded_once],
                         ids=["no-lo-parts", "rounded-first", "dx-rounded-once"])
@pytest.mark.parametrize("kind", ["mlp", "qkv"])
def test_rounding_twin_check_catches_a_defect(monkeypatch, defect, kind):
    """The controls: a plausible defect of the split branch fails :func:`assert_rounding_twin`."""
    defect(monkeypatch)
    ours, theirs = _ours_and_peft(kind, "swiglu" if kind == "mlp" else None, False)
    stats = [rounding_twin_stats(a, b) for a, b in zip(ours[0] + ours[1][:1], theirs[0] + theirs[1][:1])]
    assert any(share > TWIN_MISMATCH or rel > TWIN_REL_L2 for share, rel in stats), stats


class _Fp32Outputs(TorchDispatchMode):
    """Records the largest fp32 ``[*, F]`` tensor (an activation of the MLP's width) any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == INTER:
                self.largest = max(self.largest, t.numel())
        return out


def _mlp_run(pm, x, dy, mode=None):
    _, ours_fn, _, mods = case("mlp", pm)
    params = lora_params(mods)
    xx = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    y = ours_fn(xx)
    if mode is None:
        y.backward(dy)
    else:
        with mode:
            y.backward(dy)
    return [y.detach(), xx.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4-bf16"])
def test_chunked_adapter_casts_bound_fp32_transients(monkeypatch, nf4):
    """Without chunks the MLP backward makes fp32 ``[N, F]`` copies (of de, dg and h); with them
    no fp32 ``[*, F]`` tensor exceeds one chunk. Results are unchanged up to fp32 summation order."""
    pm, _ = _model("mlp", "swiglu", nf4)
    # 16 rows: above the parameter-sized fp32 results ([2r, F] = [8, 72], the hi/lo dA of down_proj)
    rows, n = 16, 160
    g = torch.Generator().manual_seed(n)
    x, dy = (torch.randn(n, H, generator=g).bfloat16() for _ in range(2))
    whole = _Fp32Outputs()
    unchunked = _mlp_run(pm, x, dy, whole)
    assert whole.largest >= n * INTER
    monkeypatch.setattr(chunks, "CHUNK_BYTES", rows * INTER * 4)
    mode = _Fp32Outputs()
    chunked = _mlp_run(pm, x, dy, mode)
    assert mode.largest <= rows * INTER, (mode.largest, rows * INTER)
    # chunks change only the order of fp32 sums (in the CPU twin of the fp32-output GEMMs)
    assert_rounding_twin(chunked[0], unchunked[0], "y")
    assert_rounding_twin(chunked[1], unchunked[1], "x.grad")
    for a, b in zip(chunked[2:], unchunked[2:]):
        assert rounding_twin_stats(a, b)[1] <= TWIN_GRAD_REL_L2


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4-bf16"])
def test_mlp_down_phase_runs_in_row_chunks(monkeypatch, nf4):
    """``dh`` (``[N, I]``) is formed, turned into ``h``/``de``/``dg`` and consumed chunk by chunk;
    a 4-bit ``W_down`` is dequantized once for all chunks; results are the whole run's up to the
    fp32 summation order of ``dA_down``."""
    from corept_kernels.lora.weights import LoraWeights

    pm, _ = _model("mlp", "swiglu", nf4)
    rows, n = 16, 160
    g = torch.Generator().manual_seed(n)
    x, dy = (torch.randn(n, H, generator=g).bfloat16() for _ in range(2))
    whole = _mlp_run(pm, x, dy)
    sizes, dense = [], []
    real_glu, real_dense = lm.glu_backward_, LoraWeights.dense_weight

    def glu(h, e, g_, activation):
        sizes.append(h.shape[0])
        return real_glu(h, e, g_, activation)

    def dense_weight(self, dtype):
        w = real_dense(self, dtype)
        dense.append(tuple(w.shape))
        return w

    monkeypatch.setattr(lm, "glu_backward_", glu)
    monkeypatch.setattr(LoraWeights, "dense_weight", dense_weight)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", rows * INTER * 2)  # 16 rows of bf16 dh
    _, ours_fn, _, mods = case("mlp", pm)
    params = lora_params(mods)
    for p in params:
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)
    y = ours_fn(xx)
    dense.clear()
    y.backward(dy)
    chunked = [y.detach(), xx.grad] + [p.grad.clone() for p in params]
    assert sizes == [rows] * (n // rows), sizes
    assert dense.count((H, INTER)) == 1, dense  # W_down: once in backward, not once per chunk
    assert_rounding_twin(chunked[0], whole[0], "y")
    assert_rounding_twin(chunked[1], whole[1], "x.grad")
    for a, b in zip(chunked[2:], whole[2:]):
        assert rounding_twin_stats(a, b)[1] <= TWIN_GRAD_REL_L2


def test_chunked_forward_matches(monkeypatch):
    pm, _ = _model("qkv", None, False)
    _, ours_fn, _, mods = case("qkv", pm)
    x, dys = _inputs("qkv")
    params = lora_params(mods)
    whole = run(ours_fn, x, dys, params)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 3 * 48 * 4)  # 3 rows of the widest output
    chunked = run(ours_fn, x, dys, params)
    for a, b in zip(chunked[0] + chunked[1][:1], whole[0] + whole[1][:1]):
        assert_rounding_twin(a, b, "output/x.grad")
    for a, b in zip(chunked[1][1:], whole[1][1:]):
        assert rounding_twin_stats(a, b)[1] <= TWIN_GRAD_REL_L2
    assert len(la._rows(26, 48, torch.float32, torch.bfloat16)) == 9
    assert la._rows(26, 48, torch.bfloat16, torch.bfloat16) == [slice(0, 26)]
    assert la._rows(0, 48, torch.float32, torch.bfloat16) == [slice(0, 0)]
    assert layers(pm, QKV)[0].lora_A["default"].weight.dtype == torch.float32


class _RankProducts(TorchDispatchMode):
    """Records the most rows of any ``mm`` whose inner dimension is the LoRA rank ``r``."""

    def __init__(self, r):
        super().__init__()
        self.r, self.rows = r, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default and args[0].shape[1] == self.r and args[1].shape[0] == self.r:
            self.rows = max(self.rows, out.shape[0])
        return out


@pytest.mark.parametrize("kind", ["mlp", "qkv", "o"])
def test_same_dtype_rank_products_run_in_chunks(monkeypatch, kind):
    """bf16 adapters on a bf16 model (no casts): ``xa B^T`` and ``dxa A`` still run in row chunks,
    so neither makes a whole ``[N, width]`` temporary; every result is bitwise the unchunked one."""
    pm, _ = _model(kind, "swiglu" if kind == "mlp" else None, False)
    names = TARGETS[kind]
    for p in lora_params(layers(pm, names)):
        p.data = p.data.bfloat16()
    _, ours_fn, _, mods = case(kind, pm)
    params = lora_params(mods)
    r = params[0].shape[0]
    x, dys = _inputs(kind)
    n = x.numel() // x.shape[-1]
    whole_mode = _RankProducts(r)
    with whole_mode:
        whole = run(ours_fn, x, dys, params)
    assert whole_mode.rows == n
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 3 * 48 * 2)  # 3 rows of a 48-wide bf16 output
    mode = _RankProducts(r)
    with mode:
        chunked = run(ours_fn, x, dys, params)
    assert 0 < mode.rows <= 3 * 48 // 24 < n, mode.rows  # the narrowest output (24 wide) gets the most rows
    for a, b in zip(chunked[0] + chunked[1], whole[0] + whole[1]):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
