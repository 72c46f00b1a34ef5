"""The fused LoRA paths inside ``torch.compile``: no graph break, and compiled == eager bit for bit.

Each case runs the corept function of ``lora_helpers.case`` eagerly and compiled
(``backend="aot_eager"``: Dynamo and AOTAutograd, the parts that trace; no code generation, so
it runs on CPU through the Triton interpreter) and compares outputs and every gradient exactly:
both run the same launches, so any difference is a tracing bug (a lost gradient, a wrong fake
shape, a mutation functionalization did not see).
"""
from __future__ import annotations

import pytest
import torch
from lora_helpers import OUT_WIDTHS, TARGETS, TOKENS, H, HQ, case, lora_params, peftify, quantize_nf4, run, tiny

from corept_kernels.capabilities import get


def _check(kind, pm, dtype, activation="swiglu", tile_rows=None, expect_breaks=0, wrap=None):
    _, ours_fn, _, mods = case(kind, pm, activation, tile_rows)
    ours_fn = ours_fn if wrap is None else wrap(ours_fn)
    width = HQ if kind == "o" else H
    x = torch.randn(*TOKENS, width).to(dtype)
    dys = [torch.randn(*TOKENS, w).to(dtype) for w in OUT_WIDTHS[kind]]
    params = lora_params(mods)
    explained = torch._dynamo.explain(ours_fn)(x.clone().requires_grad_(True))
    assert explained.graph_break_count == expect_breaks, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(ours_fn, backend="aot_eager", fullgraph=expect_breaks == 0)
    eager_res, compiled_res = run(ours_fn, x, dys, params), run(compiled, x, dys, params)
    for a, b in zip(eager_res[0] + eager_res[1], compiled_res[0] + compiled_res[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    return eager_res


KINDS = [("mlp", "swiglu"), ("mlp", "geglu_tanh"), ("qkv", None), ("o", None), ("gate_up", "swiglu"),
         ("qkv_fused", None)]


@pytest.mark.parametrize("setting", ["fp32", "bf16+fp32-adapters", "bf16+bf16-adapters"])
@pytest.mark.parametrize("kind,activation", KINDS)
def test_compiled_equals_eager(kind, activation, setting):
    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    model, targets = tiny(kind, activation)
    pm = peftify(model.to(dtype), targets, fp32_adapters=setting != "bf16+bf16-adapters")
    _check(kind, pm, dtype, activation or "swiglu")


@pytest.mark.parametrize("kind", ["mlp", "qkv", "gate_up"])
def test_nf4_base_compiled_equals_eager(kind):
    """A bitsandbytes 4-bit base (nf4, double quant): its quantization state travels through the
    operators as tensors (``corept_kernels.lora.packing``) and is dequantized inside them."""
    model, targets = tiny(kind, "swiglu")
    names = targets if kind != "qkv" else TARGETS["qkv"]
    pm = peftify(quantize_nf4(model, names, torch.bfloat16), targets)
    _check(kind, pm, torch.bfloat16)


def test_biases_get_gradients_when_compiled():
    """Trainable base biases (allow_bias) on q/k/v: their gradients come through the operator."""
    from corept_kernels.lora import LoraWeights, lora_qkv

    gen = torch.Generator().manual_seed(3)

    def lw(out):
        return LoraWeights(torch.randn(out, H, generator=gen), torch.randn(4, H, generator=gen).requires_grad_(),
                           torch.randn(out, 4, generator=gen).requires_grad_(), 2.0,
                           bias=torch.randn(out, generator=gen).requires_grad_())
    lws = [lw(HQ), lw(24), lw(24)]
    biases = [w.bias for w in lws]

    def fn(x):
        return lora_qkv(x, *lws)
    x = torch.randn(*TOKENS, H)
    dys = [torch.randn(*TOKENS, w) for w in (HQ, 24, 24)]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_res, compiled_res = run(fn, x, dys, biases), run(compiled, x, dys, biases)
    for a, b in zip(eager_res[1], compiled_res[1]):
        assert a is not None and torch.equal(a, b)


def test_mixed_trained_biases_keep_their_gradients():
    """Biases on some linears only, trained: the call keeps the eager Function (a graph break),
    since an operator's list with ``None`` in it takes no gradients."""
    from corept_kernels.lora import LoraWeights, lora_qkv

    gen = torch.Generator().manual_seed(4)
    lws = [LoraWeights(torch.randn(o, H, generator=gen), torch.randn(4, H, generator=gen).requires_grad_(),
                       torch.randn(o, 4, generator=gen).requires_grad_(), 2.0,
                       bias=torch.randn(o, generator=gen).requires_grad_() if i == 1 else None)
           for i, o in enumerate((HQ, 24, 24))]

    def fn(x):
        return lora_qkv(x, *lws)
    x = torch.randn(*TOKENS, H)
    dys = [torch.randn(*TOKENS, w) for w in (HQ, 24, 24)]
    compiled = torch.compile(fn, backend="aot_eager")
    eager_res, compiled_res = run(fn, x, dys, [lws[1].bias]), run(compiled, x, dys, [lws[1].bias])
    assert compiled_res[1][1] is not None and torch.equal(eager_res[1][1], compiled_res[1][1])


def test_tiled_mlp_breaks_the_graph_once_and_stays_exact():
    """Row-tiled MLP calls (long sequences) have no operator form: one graph break, eager inside."""
    pm = peftify(*tiny("mlp", "swiglu"))
    _check("mlp", pm, torch.float32, tile_rows=5, expect_breaks=1, wrap=lambda fn: lambda x: fn(x.sin()).cos())


def _shared_storage(grads):
    """``grads`` as one storage's slices without view metadata: what the GPU path returns."""
    live = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1) for g in live])
    out, off = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[off:off + g.numel()].view_as(g).detach())
        off += g.numel()
    return out


@pytest.mark.parametrize("kind", ["mlp", "qkv"])
def test_operators_copy_outputs_that_share_storage(kind, monkeypatch):
    """On CUDA (torch 2.11) the ``dA`` slices of one product reached the operator's return without
    view metadata, and torch's aliasing check failed the compiled backward. Returned gradients that
    share one storage must come out as separate tensors, equal to eager's."""
    import corept_kernels.ops.lora as ops

    if kind == "mlp":
        real = ops.mlp_backward
        monkeypatch.setattr(ops, "mlp_backward", lambda *a: (lambda dx, dAs, dBs, dbs: (
            dx, _shared_storage(dAs), _shared_storage(dBs), dbs))(*real(*a)))
    else:
        real = ops.shared_backward
        monkeypatch.setattr(ops, "shared_backward", lambda *a: (lambda dx, dAs, dBs, dbs: (
            dx, _shared_storage(dAs), _shared_storage(dBs), dbs))(*real(*a)))
    model, targets = tiny(kind, "swiglu")
    _check(kind, peftify(model.to(torch.bfloat16), targets), torch.bfloat16)


def test_lora_kernels_declare_compile_safe():
    for name in ("lora_mlp", "lora_qkv", "lora_o"):
        assert get(name).compile_safe
