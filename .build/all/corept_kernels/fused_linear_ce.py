"""Fused lm_head + cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without [N, V] logits.

Tokens are processed in chunks of ``chunk_size`` rows. For each chunk the logits
``[chunk, V] = hidden_chunk @ weight.T`` are made by a torch matmul (cuBLAS, in the input dtype,
like HF's ``lm_head``), then the cross-entropy row kernels of :mod:`corept_kernels.cross_entropy`
read them (upcast to fp32 inside the kernel, like HF's ``logits.float()``) and write the loss,
``lse`` and — on the fast path — ``d loss / d logits`` *into the chunk's logits buffer* (private to
this function, so overwriting it is safe). The chunk's gradient is then folded at once into
``grad_hidden[chunk] = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden_chunk`` (fp32
accumulator, only when ``weight`` requires grad: a frozen lm_head, the LoRA case, skips it) and
``grad_bias += dlogits.sum(0)``. Backward then only multiplies those by the scalar upstream grad.

Fast path: ``reduction`` "mean"/"sum" without ``return_logprobs`` (the gradient's per-token scale
is known in forward: 1 / (non-ignored count or ``num_items_in_batch``), counted on device before
the loop). Otherwise (``reduction="none"`` or ``return_logprobs=True``, whose per-token upstream
grads are only known in backward) forward saves ``lse`` [N] and backward recomputes each chunk's
logits: one extra matmul, memory still bounded by one chunk.

Largest buffers: one chunk of logits ``[chunk, V]`` (input dtype), ``grad_hidden`` [N, H], and with
a trainable weight the fp32 accumulator [V, H] (kept until backward, where it is scaled and cast
to the weight dtype in one rounding).
"""
from __future__ import annotations

import importlib
import math

import torch
import triton

from corept_kernels import capabilities
from corept_kernels.cross_entropy import launch_backward, launch_forward, new_buffer
ref = importlib.import_module("corept_kernels.torch_ref.cross_entropy")  # the module, not a re-export

#: Default target size in bytes of one chunk's logits (see :func:`default_chunk_size`).
CHUNK_BUDGET_BYTES = 256 * 2**20


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: the larger of two rules, then at most ``n_tokens``.

    1. chunk logits about the size of ``hidden``: ``next_pow2(ceil(N / ceil(V / H)))``;
    2. chunk logits up to :data:`CHUNK_BUDGET_BYTES` (a power of two of tokens), so the matmuls
       stay large (few passes over the weight and the fp32 grad accumulator).

    E.g. N=8192, H=4096, V=128256 bf16 -> 1024 tokens (263 MB of chunk logits, 8 chunks).
    """
    if n_tokens <= 0:
        return 1
    by_hidden = triton.next_power_of_2(math.ceil(n_tokens / math.ceil(vocab_size / hidden_size)))
    per_token = vocab_size * torch.empty((), dtype=dtype).element_size()
    fit = max(1, CHUNK_BUDGET_BYTES // per_token)
    by_budget = 1 << (fit.bit_length() - 1)
    return max(1, min(n_tokens, max(by_hidden, by_budget)))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[C, H] @ [V, H].T (+ bias) -> fresh contiguous [C, V] in the input dtype."""
    if bias is None:
        return torch.mm(h, weight.t())
    return torch.addmm(bias.to(h.dtype), h, weight.t())


_ADDMM_FP32_OUT_DTYPE: bool | None = None  # does this torch/cuBLAS take addmm(out_dtype=fp32)?


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly bf16/fp16 (no [V, H] temp on CUDA)."""
    global _ADDMM_FP32_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_FP32_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_FP32_OUT_DTYPE = False
    acc.addmm_(a.float(), b.float())  # CPU / old torch: upcast copies of one chunk only


def _fold_chunk(dl, h, weight, s, e, grad_h, acc_w, acc_b) -> None:
    """Accumulate one chunk's ``dlogits`` [C, V] into the hidden / weight / bias gradients."""
    if grad_h is not None:
        torch.mm(dl, weight, out=grad_h[s:e])
    if acc_w is not None:
        _addmm_fp32(acc_w, dl.t(), h)
    if acc_b is not None:
        acc_b += dl.sum(0, dtype=torch.float32)


def _scaled(t: torch.Tensor | None, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``t * g`` computed in fp32 and rounded once to ``dtype`` (``g`` an fp32 0-d tensor)."""
    if t is None:
        return None
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    torch.mul(t if t.dtype == torch.float32 else t.float(), g, out=out)
    return out


class _FusedLinearCE(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (loss, label log-probs [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, reduction, divisor, return_lp, chunk,
                grad_on):
        N, dev = hidden.shape[0], hidden.device
        need_h, need_w, need_b = (bool(grad_on and n) for n in ctx.needs_input_grad[:3])
        fast = (need_h or need_w or need_b) and reduction != "none" and not return_lp
        loss = new_buffer((N,), torch.float32, dev)
        lse = new_buffer((N,), torch.float32, dev)
        lp = new_buffer((N,), torch.float32, dev) if return_lp else None
        grad_h = acc_w = acc_b = scale = None
        if fast:
            scale = (1.0 / divisor) if divisor is not None else torch.ones((), device=dev)
            grad_h = new_buffer(hidden.shape, hidden.dtype, dev) if need_h else None
            acc_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
            acc_b = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if need_b else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = _chunk_logits(hidden[s:e], weight, bias)
            launch_forward(logits, labels[s:e], loss[s:e], lse[s:e],
                           logprobs=None if lp is None else lp[s:e], grad_scale=scale,
                           dx=logits if fast else None, **opts)
            if fast:
                _fold_chunk(logits, hidden[s:e], weight, s, e, grad_h, acc_w, acc_b)
            del logits
        ctx.fast, ctx.opts, ctx.reduction, ctx.chunk = fast, opts, reduction, chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if fast:
            ctx.save_for_backward(grad_h, acc_w, acc_b)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse, divisor)
        ctx.set_materialize_grads(False)
        if lp is None:
            lp = torch.zeros((0,), dtype=torch.float32, device=dev)
            ctx.mark_non_differentiable(lp)
        out = ref.reduce_rows(loss, divisor, reduction, loss.shape)
        return out, lp

    @staticmethod
    def backward(ctx, g_loss, g_lp):
        h_dt, w_dt, b_dt = ctx.dtypes
        if ctx.fast:
            grad_h, acc_w, acc_b = ctx.saved_tensors
            if g_loss is None:
                return (None,) * 10
            g = g_loss.float()
            return (_scaled(grad_h, g, h_dt), _scaled(acc_w, g, w_dt), _scaled(acc_b, g, b_dt),
                    None, None, None, None, None, None, None)
        hidden, weight, bias, labels, lse, divisor = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, dev = hidden.shape[0], hidden.device
        if g_loss is None:
            g = torch.zeros((), dtype=torch.float32, device=dev)
        else:
            g = g_loss.float()
            g = g.reshape(-1) if ctx.reduction == "none" else (g / divisor if divisor is not None else g)
        q = None if g_lp is None else g_lp.float().reshape(-1)
        grad_h = new_buffer(hidden.shape, h_dt, dev) if need_h else None
        acc_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        acc_b = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if need_b else None
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            logits = _chunk_logits(hidden[s:e], weight, bias)
            launch_backward(logits, labels[s:e], lse[s:e], logits, g if g.dim() == 0 else g[s:e],
                            None if q is None else q[s:e], **ctx.opts)
            _fold_chunk(logits, hidden[s:e], weight, s, e, grad_h, acc_w, acc_b)
            del logits
        grad_w = None if acc_w is None else acc_w.to(w_dt)
        grad_b = None if acc_b is None else acc_b.to(b_dt)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _fused_linear_ce_triton(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None,
                            label_smoothing=0.0, reduction="mean", num_items_in_batch=None,
                            z_loss=0.0, return_logprobs=False, chunk_size=None):
    """The Triton path of :func:`fused_linear_cross_entropy` (same signature), always Triton."""
    ref.check_options(reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
                      z_loss=z_loss, num_items_in_batch=num_items_in_batch)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1).contiguous()
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, {H}]")
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} is not [{weight.shape[0]}]")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(h.shape[0], H, weight.shape[0],
                                                                  hidden.dtype)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    divisor = ref.loss_divisor(y, ignore_index, reduction, num_items_in_batch, hidden.device)
    opts = dict(ignore_index=int(ignore_index), softcap=None if softcap is None else float(softcap),
                label_smoothing=float(label_smoothing), z_loss=float(z_loss))
    loss, lp = _FusedLinearCE.apply(h, weight, bias, y, opts, reduction, divisor, return_logprobs,
                                    chunk, torch.is_grad_enabled())
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return (loss, lp.reshape(labels.shape)) if return_logprobs else loss


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               softcap: float | None = None, label_smoothing: float = 0.0,
                               reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0,
                               return_logprobs: bool = False, chunk_size: int | None = None):
    """Cross-entropy of ``hidden @ weight.T + bias`` without materializing the [N, V] logits.

    :param hidden: [..., H] (fp32/bf16/fp16), may or may not require grad.
    :param weight: [V, H] lm_head weight, same dtype; frozen (LoRA) or trainable.
    :param labels: [...] integer, ``ignore_index`` for tokens without a target.
    :param bias: [V] or None.
    :param chunk_size: tokens per chunk; default :func:`default_chunk_size`.
    :param return_logprobs: also return the fp32 log-probs of the label tokens [...] (0 where
        ignored; no smoothing / z-loss terms), differentiable, e.g. for DPO/KTO.
    :returns: loss like :func:`corept_kernels.cross_entropy` (``ignore_index``, ``softcap``,
        ``label_smoothing``, ``reduction``, ``num_items_in_batch``, ``z_loss`` mean the same),
        or ``(loss, logprobs)``.
    """
    under_compile = torch.compiler.is_compiling()
    fn, _ = capabilities.select("fused_linear_cross_entropy", hidden.device,
                                under_compile=under_compile)
    return fn(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
              label_smoothing=label_smoothing, reduction=reduction,
              num_items_in_batch=num_items_in_batch, z_loss=z_loss,
              return_logprobs=return_logprobs, chunk_size=chunk_size)


capabilities.register(capabilities.KernelInfo(
    name="fused_linear_cross_entropy", triton_fn=_fused_linear_ce_triton,
    reference_fn=ref.fused_linear_cross_entropy, has_backward=True, compile_safe=False,
    devices=("cuda",),
    notes="token-chunked lm_head matmul + CE kernels; grads folded per chunk; no [N, V] logits"))
