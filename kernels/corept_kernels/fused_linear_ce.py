"""Fused lm_head + cross-entropy: the loss of ``logit_scale * (hidden @ weight.T (+ bias))`` without
[N, V] logits.

Tokens are processed in chunks of ``chunk_size`` rows. For each chunk the logits
``[chunk, V] = hidden_chunk @ weight.T`` are made by a torch matmul (cuBLAS, in the input dtype,
like HF's ``lm_head``), then the cross-entropy row kernels of :mod:`corept_kernels.cross_entropy`
read them (upcast to fp32 inside the kernel, like HF's ``logits.float()``, and multiplied there by
``logit_scale``: one rounding of the logits, not a second one by a bf16 multiply) and write the loss,
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
a trainable weight the fp32 accumulator [V, H] in row slices (kept until backward, where each slice
is scaled and cast to the weight dtype in one rounding, then freed). Measured on an H200 at
Llama-3.1-8B shapes (8192 tokens): peak 2.5 GiB with a trained lm_head, 0.55 GiB frozen, against
11.7 GiB for ``F.cross_entropy((h @ W.T).float(), y)``.
"""
from __future__ import annotations

import importlib
import math

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
from corept_kernels.cross_entropy import kernel_options, launch_backward, launch_forward, new_buffer
ref = importlib.import_module("corept_kernels.torch_ref.cross_entropy")  # the module, not a re-export

#: Default target size in bytes of one chunk's logits (see :func:`default_chunk_size`).
CHUNK_BUDGET_BYTES = 512 * 2**20
#: Row slices of the fp32 grad_weight accumulator (see :class:`_Grads`).
WEIGHT_SLICES = 4


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: the larger of two rules, then at most ``n_tokens``.

    1. chunk logits about the size of ``hidden``: ``next_pow2(ceil(N / ceil(V / H)))``;
    2. chunk logits up to :data:`CHUNK_BUDGET_BYTES` (a power of two of tokens), so the matmuls
       stay large (few passes over the weight and the fp32 grad accumulator).

    E.g. N=8192, H=4096, V=128256 bf16 -> 2048 tokens (525 MB of chunk logits, 4 chunks). On an
    H200 2048-token chunks ran fwd+bwd 8% faster than 1024 and 45% faster than 256.
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


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int = 1) -> None:
    """``acc = beta * acc + a @ b``, ``acc`` fp32, ``a``/``b`` possibly bf16 (no [V, H] temp on
    CUDA). ``beta=0`` ignores ``acc``'s old content, NaN included (first chunk: no zero-fill)."""
    global _ADDMM_FP32_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
        return
    if acc.is_cuda and _ADDMM_FP32_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_FP32_OUT_DTYPE = False
    acc.addmm_(a.float(), b.float(), beta=beta)  # CPU / old torch: upcast copies of one chunk


@triton.jit
def _scale_cast_kernel(X, Y, G, n, BLOCK: tl.constexpr):
    """Y[i] = X[i] * G[0] in fp32, stored in Y's dtype (X and Y may alias)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    tl.store(Y + offs, (x * g).to(Y.dtype.element_ty), mask=mask)


def _cast(t: torch.Tensor, g: torch.Tensor | None, dtype: torch.dtype,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """``t * g`` (fp32 math, one rounding) as ``dtype``, into ``out`` if given (may be ``t``).

    ``t`` contiguous; ``g`` an fp32 0-d tensor or None (= 1). One fused pass (torch's mixed-dtype
    ``mul(out=)`` ran at a third of the bandwidth on an H200).
    """
    if g is None and out is None:
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device) if out is None else out
    if g is None:
        return out.copy_(t)
    block = 4096
    _scale_cast_kernel[(triton.cdiv(t.numel(), block),)](t, out, g, t.numel(), BLOCK=block,
                                                          num_warps=8)
    return out


class _Grads:
    """Gradient buffers of one call, filled chunk by chunk, handed out once by :meth:`take`.

    ``h``: grad_hidden [N, H] in the hidden dtype. ``w``: the fp32 grad_weight [V, H] held as
    :data:`WEIGHT_SLICES` row slices, so the final scale-and-cast to the weight dtype frees fp32
    memory slice by slice (peak: fp32 accumulator + one slice, not + the whole output). ``b``:
    fp32 grad_bias [V]. With ``whole_w`` the slices are views of one [V, H] buffer, ``w_whole``
    (an operator returns the accumulator as one tensor; see :meth:`unscaled`).
    """

    def __init__(self, hidden, weight, bias, need_h, need_w, need_b, whole_w=False):
        dev = hidden.device
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.h = new_buffer(hidden.shape, hidden.dtype, dev) if need_h else None
        self.w, self.w_whole = [], None
        if need_w:
            V, H = weight.shape
            step = -(-V // WEIGHT_SLICES)
            if whole_w:
                self.w_whole = new_buffer((V, H), torch.float32, dev)
            self.w = [self.w_whole[v0:v0 + step] if whole_w else
                      new_buffer((min(step, V - v0), H), torch.float32, dev) for v0 in range(0, V, step)]
        self.b = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if need_b else None
        self.folded = self.taken = False

    def fold(self, dl: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, s: int, e: int) -> None:
        """Accumulate one chunk's ``dlogits`` [C, V] (rows ``s:e``) into the gradients."""
        if self.h is not None:
            torch.mm(dl, weight, out=self.h[s:e])
        v0 = 0
        for acc in self.w:  # the first chunk overwrites (beta 0): no zero-fill, one read fewer
            _addmm_fp32(acc, dl[:, v0:v0 + acc.shape[0]].t(), h, beta=1 if self.folded else 0)
            v0 += acc.shape[0]
        self.folded = True
        if self.b is not None:
            self.b += dl.sum(0, dtype=torch.float32)

    def take(self, g: torch.Tensor | None):
        """(grad_hidden, grad_weight, grad_bias), each times ``g``; releases the buffers."""
        if self.taken:
            raise RuntimeError("fused_linear_cross_entropy: this graph's backward already ran "
                               "(the fast path keeps its gradients for one backward only)")
        self.taken = True
        h_dt, w_dt, b_dt = self.dtypes
        gh, self.h = self.h, None
        if gh is not None and g is not None:
            _cast(gh, g, gh.dtype, out=gh)  # in place
        self._zero_if_unfolded()
        pieces = []
        while self.w:
            pieces.append(_cast(self.w.pop(0), g, w_dt))  # the fp32 slice is freed here
        gw = None if not pieces else (pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        del pieces
        gb, self.b = (None if self.b is None else _cast(self.b, g, b_dt)), None
        return gh, gw, gb

    def unscaled(self):
        """(grad_hidden, grad_weight [V, H] fp32, grad_bias [V] fp32) as accumulated (``None``
        where not computed); needs ``whole_w``. Scaled later by :func:`_scale_grads`."""
        self._zero_if_unfolded()
        return self.h, self.w_whole, self.b

    def _zero_if_unfolded(self) -> None:
        if not self.folded:  # no tokens: nothing was accumulated
            for acc in self.w:
                acc.zero_()


def _is_fast(need, reduction: str, return_lp: bool) -> bool:
    """Whether the gradients are computed in forward (see the module docstring)."""
    return any(need) and reduction != "none" and not return_lp


def _forward(hidden, weight, bias, labels, opts: dict, reduction: str, divisor, return_lp: bool,
             chunk: int, need, whole_w: bool = False):
    """``(out, lp [N] | None, lse [N], grads | None)`` for ``hidden [N, H]``, ``weight [V, H]``,
    ``bias [V] | None``, ``labels [N]``; ``out`` the fp32 loss reduced as ``reduction``; ``need``
    the (hidden, weight, bias) gradients wanted. On the fast path ``grads`` (a :class:`_Grads`)
    holds d out / d inputs, to be scaled by the upstream gradient."""
    N, dev = hidden.shape[0], hidden.device
    fast = _is_fast(need, reduction, return_lp)
    loss = new_buffer((N,), torch.float32, dev)
    lse = new_buffer((N,), torch.float32, dev)
    lp = new_buffer((N,), torch.float32, dev) if return_lp else None
    grads = _Grads(hidden, weight, bias, *need, whole_w=whole_w) if fast else None
    scale = None
    if fast:
        scale = (1.0 / divisor) if divisor is not None else torch.ones((), device=dev)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        logits = _chunk_logits(hidden[s:e], weight, bias)
        launch_forward(logits, labels[s:e], loss[s:e], lse[s:e],
                       logprobs=None if lp is None else lp[s:e], grad_scale=scale,
                       dx=logits if fast else None, **opts)
        if fast:
            grads.fold(logits, hidden[s:e], weight, s, e)
        del logits
    return ref.reduce_rows(loss, divisor, reduction, loss.shape), lp, lse, grads


def _backward(g_loss, g_lp, hidden, weight, bias, labels, lse, divisor, opts: dict, reduction: str,
              chunk: int, need):
    """The slow path's ``(grad_hidden, grad_weight, grad_bias)`` (``None`` where not in ``need``):
    each chunk's logits recomputed, from the upstream ``g_loss`` (0-d, or [N] for "none"; ``None``
    = 0) and ``g_lp`` ([N] or ``None``)."""
    N, dev = hidden.shape[0], hidden.device
    if g_loss is None:
        g = torch.zeros((), dtype=torch.float32, device=dev)
    else:
        g = g_loss.float()
        g = g.reshape(-1) if reduction == "none" else (g / divisor if divisor is not None else g)
    q = None if g_lp is None else g_lp.float().reshape(-1)
    grads = _Grads(hidden, weight, bias, *need)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        logits = _chunk_logits(hidden[s:e], weight, bias)
        launch_backward(logits, labels[s:e], lse[s:e], logits, g if g.dim() == 0 else g[s:e],
                        None if q is None else q[s:e], **opts)
        grads.fold(logits, hidden[s:e], weight, s, e)
        del logits
    return grads.take(None)


def _scale_grads(g, gh, gw, gb, w_dtype: torch.dtype, b_dtype: torch.dtype):
    """The fast path's :meth:`_Grads.unscaled` gradients times the upstream ``g`` (0-d), as
    :meth:`_Grads.take` makes them (fp32 math, one rounding to hidden's / ``w_dtype`` /
    ``b_dtype``), into fresh tensors (a placeholder of a gradient not computed is scaled too, and
    ignored by the caller)."""
    g = g.float()
    return tuple(_cast(t, g, dt) for t, dt in ((gh, gh.dtype), (gw, w_dtype), (gb, b_dtype)))


class _FusedLinearCE(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> (loss, label log-probs [N]).
    The eager form; inside ``torch.compile`` the operators of
    :mod:`corept_kernels.ops.fused_linear_ce` run the same code."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, reduction, divisor, return_lp, chunk,
                grad_on):
        need = [bool(grad_on and n) for n in ctx.needs_input_grad[:3]]
        out, lp, lse, grads = _forward(hidden, weight, bias, labels, opts, reduction, divisor,
                                       return_lp, chunk, need)
        ctx.fast, ctx.opts, ctx.reduction, ctx.chunk = grads is not None, opts, reduction, chunk
        ctx.device_type = hidden.device.type
        if ctx.fast:
            ctx.grads = grads  # not save_for_backward: backward releases it piece by piece
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse, divisor)
        ctx.set_materialize_grads(False)
        if lp is None:
            lp = torch.zeros((0,), dtype=torch.float32, device=hidden.device)
            ctx.mark_non_differentiable(lp)
        return out, lp

    @staticmethod
    def backward(ctx, g_loss, g_lp):
        with torch.autocast(ctx.device_type, enabled=False):
            if ctx.fast:
                grads = (None, None, None) if g_loss is None else ctx.grads.take(g_loss.float())
            else:
                hidden, weight, bias, labels, lse, divisor = ctx.saved_tensors
                grads = _backward(g_loss, g_lp, hidden, weight, bias, labels, lse, divisor, ctx.opts,
                                  ctx.reduction, ctx.chunk, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None, None)


def _prepare(hidden, weight, labels, bias, ignore_index, softcap, logit_scale, label_smoothing,
             reduction, num_items_in_batch, z_loss, chunk_size):
    """The checked arguments of the kernel path: ``(h [N, H], weight, y [N], chunk, divisor,
    opts)``, ``h`` and ``weight`` in the matmul dtype."""
    ref.check_options(reduction=reduction, logit_scale=logit_scale, softcap=softcap,
                      label_smoothing=label_smoothing, z_loss=z_loss,
                      num_items_in_batch=num_items_in_batch)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1).contiguous()
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, {H}]")
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} is not [{weight.shape[0]}]")
    dt = ref.matmul_dtype(hidden, weight)  # casts are differentiable: grads return in each dtype
    chunk = int(chunk_size) if chunk_size else default_chunk_size(h.shape[0], H, weight.shape[0], dt)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    divisor = ref.loss_divisor(y, ignore_index, reduction, num_items_in_batch, hidden.device)
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    return h.to(dt), weight.to(dt), y, chunk, divisor, opts


def _finish(loss, lp, labels, reduction, return_logprobs):
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return (loss, lp.reshape(labels.shape)) if return_logprobs else loss


def _fused_linear_ce_triton(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None,
                            logit_scale=1.0, label_smoothing=0.0, reduction="mean",
                            num_items_in_batch=None, z_loss=0.0, return_logprobs=False, chunk_size=None):
    """The Triton path of :func:`fused_linear_cross_entropy` (same signature), always Triton."""
    h, w, y, chunk, divisor, opts = _prepare(hidden, weight, labels, bias, ignore_index, softcap,
                                             logit_scale, label_smoothing, reduction,
                                             num_items_in_batch, z_loss, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):  # explicit dtypes; out= matmuls inside
        loss, lp = _FusedLinearCE.apply(h, w, bias, y, opts, reduction, divisor, return_logprobs,
                                        chunk, torch.is_grad_enabled())
    return _finish(loss, lp, labels, reduction, return_logprobs)


def _fused_linear_ce_compiled(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None,
                              logit_scale=1.0, label_smoothing=0.0, reduction="mean",
                              num_items_in_batch=None, z_loss=0.0, return_logprobs=False, chunk_size=None):
    """The ``torch.compile`` form of :func:`_fused_linear_ce_triton` (custom operators, which
    cannot see ``needs_input_grad``: the wanted gradients are arguments)."""
    h, w, y, chunk, divisor, opts = _prepare(hidden, weight, labels, bias, ignore_index, softcap,
                                             logit_scale, label_smoothing, reduction,
                                             num_items_in_batch, z_loss, chunk_size)
    grad_on = torch.is_grad_enabled()
    out = torch.ops.corept_kernels.fused_linear_ce_fwd(
        h, w, bias, y, divisor, reduction, **opts, return_lp=return_logprobs, chunk=chunk,
        need_h=grad_on and h.requires_grad, need_w=grad_on and w.requires_grad,
        need_b=grad_on and bias is not None and bias.requires_grad)
    return _finish(out[0], out[1], labels, reduction, return_logprobs)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                               reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0,
                               return_logprobs: bool = False, chunk_size: int | None = None):
    """Cross-entropy of ``logit_scale * (hidden @ weight.T + bias)`` without materializing the
    [N, V] logits; then ``softcap * tanh(logits / softcap)`` if ``softcap`` is set.

    :param hidden: [..., H] (fp32/bf16/fp16), may or may not require grad.
    :param weight: [V, H] lm_head weight, frozen (LoRA) or trainable. The matmuls run in the
        promoted dtype of ``hidden`` and ``weight``, or in autocast's dtype under autocast.
    :param labels: [...] integer, ``ignore_index`` for tokens without a target.
    :param bias: [V] or None.
    :param logit_scale: multiplies the logits (bias included) before the softcap and the loss, in
        fp32 inside the kernels, forward and backward (e.g. ``1 / config.logits_scaling`` for
        Granite, ``config.logit_scale`` for Cohere).
    :param chunk_size: tokens per chunk; default :func:`default_chunk_size`.
    :param return_logprobs: also return the fp32 log-probs of the label tokens [...] (0 where
        ignored; no smoothing / z-loss terms), differentiable, e.g. for DPO/KTO.
    :returns: loss like :func:`corept_kernels.cross_entropy` (``ignore_index``, ``softcap``,
        ``label_smoothing``, ``reduction``, ``num_items_in_batch``, ``z_loss`` mean the same),
        or ``(loss, logprobs)``.
    """
    fn, _ = capabilities.dispatch("fused_linear_cross_entropy", hidden, weight, labels, bias)
    return fn(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
              logit_scale=logit_scale, label_smoothing=label_smoothing, reduction=reduction,
              num_items_in_batch=num_items_in_batch, z_loss=z_loss,
              return_logprobs=return_logprobs, chunk_size=chunk_size)


capabilities.register(capabilities.KernelInfo(
    name="fused_linear_cross_entropy", triton_fn=_fused_linear_ce_triton,
    reference_fn=ref.fused_linear_cross_entropy, compiled_fn=_fused_linear_ce_compiled,
    notes="token-chunked lm_head matmul + CE kernels; grads folded per chunk; no [N, V] logits"))
