"""rope (Triton, through the interpreter) vs float64 gold and HF's apply_rotary_pos_emb."""
import importlib

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from corept_kernels import capabilities
from corept_kernels.rope import rope
from corept_kernels.torch_ref import rope as ref
from tolerances import assert_close_fp32, assert_low_precision_ok

rope_mod = importlib.import_module("corept_kernels.rope")  # the package attribute is the function


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(rope_mod, "POISON_OUTPUTS", True)


def _cos_sin(position_ids, dim, base=10000.0):
    """HF-style cos/sin ``[B, S, dim]`` (halves duplicated) for integer ``position_ids [B, S]``."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = position_ids.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _qk(B, Hq, Hk, S, D, dtype, layout="hf"):
    """q, k of shape [B, H, S, D]: ``"hf"`` is HF's ``view(B, S, H, D).transpose(1, 2)`` layout."""
    if layout == "hf":
        q = torch.randn(B, S, Hq, D, dtype=torch.float64).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, Hk, D, dtype=torch.float64).to(dtype).transpose(1, 2)
        return q, k
    return (torch.randn(B, Hq, S, D, dtype=torch.float64).to(dtype),
            torch.randn(B, Hk, S, D, dtype=torch.float64).to(dtype))


def _gold(q, k, cos, sin):
    """HF's apply_rotary_pos_emb on the first Dr dims, the rest passed through."""
    dr = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    qr, kr = apply_rotary_pos_emb(q[..., :dr], k[..., :dr], cos, sin)
    return torch.cat((qr, q[..., dr:]), -1), torch.cat((kr, k[..., dr:]), -1)


def _leaf(t):
    """A leaf copy of ``t`` with the same strides (``clone`` would compact a sliced view)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _run(fn, q, k, cos, sin, dq, dk):
    q, k = _leaf(q), _leaf(k)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), q.grad, k.grad


def _check(q, k, cos, sin, same_layout=True):
    """Outputs and both input grads vs float64 gold (fp32: tight; bf16: vs HF in bf16)."""
    dq = torch.randn(q.shape, dtype=torch.float64).to(q.dtype)
    dk = torch.randn(k.shape, dtype=torch.float64).to(k.dtype)
    q_in, k_in = q.clone(), k.clone()
    got = _run(rope, q, k, cos, sin, dq, dk)
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "rope modified its inputs"
    gold = _run(_gold, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    assert [t.dtype for t in got] == [q.dtype, k.dtype] * 2
    if same_layout:
        assert got[0].stride() == q.stride() and got[1].stride() == k.stride(), "layout not kept"
    if q.dtype == torch.float32:
        for g, w in zip(got, gold):
            assert_close_fp32(g, w)
        return
    # HF in bf16 with cos/sin in the model dtype, as its rotary module returns them.
    low = _run(_gold, q, k, cos.to(q.dtype), sin.to(q.dtype), dq, dk)
    for name, g, w, lo in zip(("q", "k", "dq", "dk"), got, gold, low):
        assert_low_precision_ok(g, w, lo, name)


@pytest.fixture(params=[(False, 0), (True, 0), (False, 256), (True, 256)],
                ids=["qk-separate", "qk-fused", "qk-separate-token-blocks", "qk-fused-token-blocks"])
def layout(request, monkeypatch):
    """Both program layouts the CUDA tuner chooses between (q and k heads in separate programs, or a
    token's q and k in one program), with one token per program (as on CUDA) and with blocks of
    tokens whose last one is part-masked (256 pairs: 4 or 8 tokens here; other tests run the
    default, one block of every token)."""
    fuse, token_tile = request.param
    monkeypatch.setattr(rope_mod, "FUSE_QK_OFF_CUDA", fuse)
    monkeypatch.setattr(rope_mod, "TOKEN_TILE_OFF_CUDA", token_tile)
    return request.param


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gqa_per_row_positions(Hq, Hk, dtype, layout):
    B, S, D = 2, 7, 16
    pos = torch.stack([torch.arange(S) + 5, torch.tensor([0, 1, 2, 0, 1, 2, 3])])  # row 1: packed
    cos, sin = _cos_sin(pos, D)
    q, k = _qk(B, Hq, Hk, S, D, dtype)
    _check(q, k, cos.float(), sin.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_several_head_groups_per_tensor(monkeypatch, dtype):
    """Two heads per program: q in 3 groups, k in 2 (the last one half masked)."""
    monkeypatch.setattr(rope_mod, "HEAD_TILE", 16)
    B, S, D = 2, 3, 16
    cos, sin = _cos_sin(torch.randint(0, 40, (B, S)), D)
    q, k = _qk(B, 6, 3, S, D, dtype)
    _check(q, k, cos.float(), sin.float())


@pytest.mark.parametrize("D,Dr", [(16, 8), (24, 12), (20, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_partial_rotary(D, Dr, dtype, layout):
    B, S = 2, 5
    cos, sin = _cos_sin(torch.randint(0, 300, (B, S)), Dr)
    q, k = _qk(B, 4, 1, S, D, dtype)
    _check(q, k, cos.float(), sin.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_head_dim_256_contiguous_inputs(dtype):
    B, S = 1, 3
    cos, sin = _cos_sin(torch.arange(S)[None] * 1000, 256)
    q, k = _qk(B, 2, 1, S, 256, dtype, layout="contiguous")
    _check(q, k, cos.float(), sin.float())


@pytest.mark.parametrize("form", ["2d", "batch1"])
def test_rope_broadcast_cos_sin(form):
    B, S, D = 3, 4, 8
    cos, sin = _cos_sin(torch.arange(S)[None], D)  # [1, S, D]
    if form == "2d":
        cos, sin = cos[0], sin[0]
    q, k = _qk(B, 4, 2, S, D, torch.float32)
    _check(q, k, cos.float(), sin.float())


def test_rope_cos_sin_in_bf16_and_strided_q():
    """cos/sin in the model dtype (as HF returns them) and q sliced out of a fused qkv buffer."""
    B, S, Hq, Hk, D = 2, 3, 4, 2, 16
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D).to(torch.bfloat16)
    q = qkv[..., :Hq * D].view(B, S, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D).transpose(1, 2)
    cos, sin = _cos_sin(torch.randint(0, 50, (B, S)), D)
    _check(q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16), same_layout=False)


def test_rope_backward_is_exact_transpose_for_general_cos_sin():
    """With unequal cos/sin halves the adjoint is not a plain rotation by -sin; it must still be exact."""
    B, S, D = 2, 3, 8
    cos, sin = torch.randn(B, S, D), torch.randn(B, S, D)
    q, k = _qk(B, 2, 1, S, D, torch.float32)
    _check(q, k, cos, sin)


def test_rope_unused_output_gets_zero_grad():
    q, k = _qk(1, 2, 1, 3, 8, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = _cos_sin(torch.arange(3)[None], 8)
    qo, _ = rope(q, k, cos.float(), sin.float())
    (qo * 2).sum().backward()
    qg = q.detach().double().requires_grad_()
    (_gold(qg, k.double(), cos, sin)[0] * 2).sum().backward()
    assert_close_fp32(q.grad, qg.grad)
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_rope_twin_matches_gold_and_fallback(monkeypatch):
    info = capabilities.get("rope")
    assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    q, k = _qk(2, 4, 2, 5, 16, torch.float32)
    cos, sin = _cos_sin(torch.randint(0, 99, (2, 5)), 8)
    cos, sin = cos.float(), sin.float()
    for t_got, t_want in zip(ref.rope(q, k, cos, sin), _gold(q.double(), k.double(), cos.double(), sin.double())):
        assert_close_fp32(t_got, t_want)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(rope_mod._RopeFn, "apply", lambda *a: pytest.fail("Triton path without interpreter"))
    for a, b in zip(rope(q, k, cos, sin), ref.rope(q, k, cos, sin)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        rope(q, k, cos[..., :5], sin[..., :5])  # odd rotary dim


@pytest.mark.parametrize("Hq,Hk,D", [(4, 2, 16), (6, 3, 64)])
def test_rope_bf16_rounds_like_transformers(Hq, Hk, D, layout):
    """bf16 q/k with bf16 cos/sin (as HF's rotary module returns them): outputs and input grads are
    transformers' bit for bit (each product, then the sum, rounded to bf16), so LoRA gradients
    through a patched attention keep the reference's error pattern (the bf16 conformance rule)."""
    B, S = 2, 9
    cos, sin = _cos_sin(torch.randint(0, 500, (B, S)), D)
    cos, sin = cos.bfloat16(), sin.bfloat16()
    q, k = _qk(B, Hq, Hk, S, D, torch.bfloat16)
    dq = torch.randn(q.shape, dtype=torch.float64).bfloat16()
    dk = torch.randn(k.shape, dtype=torch.float64).bfloat16()
    got = _run(rope, q, k, cos, sin, dq, dk)
    want = _run(_gold, q, k, cos, sin, dq, dk)
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        assert torch.equal(g, w), f"{name}: {(g.float() - w.float()).abs().max().item()}"


@pytest.mark.parametrize("Hq,Hk,D,Dr", [(4, 2, 16, 16), (6, 3, 64, 64), (4, 2, 24, 12)])
@pytest.mark.parametrize("qk_layout", ["hf", "contiguous"])
def test_rope_twin_rounds_like_transformers_and_keeps_layout(Hq, Hk, D, Dr, qk_layout):
    """The torch twin (the fallback off the Triton path) in bf16: transformers' outputs and input
    grads bit for bit, in the inputs' layout, partial rotary included; fp32 stays gold-close."""
    B, S = 2, 9
    cos, sin = _cos_sin(torch.randint(0, 500, (B, S)), Dr)
    for dtype in (torch.bfloat16, torch.float32):
        q, k = _qk(B, Hq, Hk, S, D, dtype, layout=qk_layout)
        c, s_ = cos.to(dtype), sin.to(dtype)
        dq = torch.randn(q.shape, dtype=torch.float64).to(dtype)
        dk = torch.randn(k.shape, dtype=torch.float64).to(dtype)
        got = _run(ref.rope, q, k, c, s_, dq, dk)
        assert got[0].stride() == q.stride() and got[1].stride() == k.stride(), "layout not kept"
        if dtype == torch.bfloat16:
            want = _run(_gold, q, k, c, s_, dq, dk)
            for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
                assert torch.equal(g, w), f"{name}: {(g.float() - w.float()).abs().max().item()}"
        else:
            gold = _run(_gold, q.double(), k.double(), cos, sin, dq.double(), dk.double())
            for g, w in zip(got, gold):
                assert_close_fp32(g, w)
