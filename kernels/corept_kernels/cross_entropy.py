"""Cross-entropy over large vocabularies: Triton forward and backward, fp32 math, bounded memory.

One Triton program handles one token (row of logits). The forward streams the row in ``BLOCK``
chunks with an online logsumexp (so any vocabulary size works, 262,144 included) and also gathers
the label logit and the sum of logits (label smoothing). It saves only ``lse`` [N] fp32. The
backward streams the row again and writes ``d logits`` directly in the logits dtype, into a fresh
buffer (never into the caller's logits: autograd may still need them). No fp32 copy of [N, V] is
ever made. Semantics (softcap, smoothing, z-loss, reductions, all-ignored -> 0.0) are those of the
twin, :mod:`corept_kernels.torch_ref.cross_entropy`.

The logits ``x`` are scaled first, ``s = logit_scale * x``, in fp32 after the load (so a bf16
input is rounded once, not again by a bf16 multiply), then capped: ``z = softcap * tanh(s /
softcap)``. Gradient of one token's loss w.r.t. ``z``, with ``p = softmax(z)``, upstream
gradients ``g`` (loss) and ``q`` (log-prob of the label, used by the fused linear CE)::

    dz = (g * (1 + 2 c lse) - q) * p + (q - g * (1 - eps)) * onehot(y) - g * eps / V

and ``dx = dz * (1 - (z / softcap)**2) * logit_scale`` through the softcap and the scale. The row
kernels are shared with :mod:`corept_kernels.fused_linear_ce` through :func:`launch_forward` and
:func:`launch_backward`.
"""
from __future__ import annotations

import importlib
import os

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
# by module path: a package-level re-export of the function must not shadow the module
ref = importlib.import_module("corept_kernels.torch_ref.cross_entropy")

#: Largest vocabulary block one loop step loads, per device type. The interpreter cap is smaller
#: so tests exercise the chunked vocabulary loop at moderate V (tests may lower both).
MAX_BLOCK = {"cuda": 4096, "cpu": 4096}  # H200, V=128256 bf16: 4096 beat 8192 and 16384


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled when ``COREPT_KERNELS_POISON=1`` (tests: unwritten -> NaN)."""
    if os.environ.get("COREPT_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _cap(x, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(scale * x / softcap) for fp32 ``x``, tanh written through sigmoid (no libdevice)."""
    z = x * scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z


@triton.jit
def _write_row_grad(x_row, stride_xv, dx_row, stride_dv, y, valid, lse, coef_p, coef_y, coef_c,
                    V, scale, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """dx[v] = (coef_p * p[v] + coef_y * [v == y] + coef_c) * dz/dx[v] for one row (0 if ignored)."""
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        # ignored rows load nothing (limit 0); a vector & scalar-bool mask is avoided on purpose:
        # the interpreter turns it into int32, which tl.load rejects
        x = tl.load(x_row + cols * stride_xv, mask=cols < tl.where(valid, V, 0),
                    other=0.0).to(tl.float32)
        z = _cap(x, scale, softcap, HAS_SOFTCAP)
        dz = coef_p * tl.exp(z - lse) + tl.where(cols == y, coef_y, 0.0) + coef_c
        if HAS_SOFTCAP:
            t = z / softcap
            dz = dz * (1.0 - t * t)
        dz = tl.where(valid, dz * scale, 0.0)
        tl.store(dx_row + cols * stride_dv, dz.to(dx_row.dtype.element_ty), mask=inb)


@triton.jit
def _ce_fwd_kernel(X, stride_xn, stride_xv, Y, LOSS, LSE, LP, DX, stride_dn, stride_dv, G, stride_g,
                   V, ignore_index, scale, softcap, eps, z_coef,
                   HAS_SOFTCAP: tl.constexpr, HAS_SMOOTH: tl.constexpr, WRITE_LP: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id``: loss, lse (, label log-prob) (, dx with upstream scale G[row])."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    y = tl.load(Y + row).to(tl.int64)
    valid = y != ignore_index
    y_ok = valid & (y >= 0) & (y < V)
    lim = tl.where(valid, V, 0)
    m = float("-inf")
    s = 0.0
    zsum = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < V
        # ignored rows load nothing (limit 0): their values are never used
        x = tl.load(x_row + cols * stride_xv, mask=cols < lim, other=0.0).to(tl.float32)
        z = _cap(x, scale, softcap, HAS_SOFTCAP)
        if HAS_SMOOTH:
            zsum += tl.sum(tl.where(inb, z, 0.0), axis=0)
        z = tl.where(inb, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_y = tl.load(x_row + tl.where(y_ok, y, 0) * stride_xv, mask=y_ok, other=0.0).to(tl.float32)
    z_y = _cap(x_y, scale, softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - eps) * z_y - eps * (zsum / V) + z_coef * lse * lse
    loss = tl.where(y_ok | (y == ignore_index), loss, float("nan"))  # out-of-range label -> NaN
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))
    if WRITE_LP:
        tl.store(LP + row, tl.where(valid, z_y - lse, 0.0))
    if WRITE_GRAD:
        g = tl.load(G + row * stride_g).to(tl.float32)
        _write_row_grad(x_row, stride_xv, DX + row * stride_dn, stride_dv, y, valid, lse,
                        g * (1.0 + 2.0 * z_coef * lse), -g * (1.0 - eps), -g * eps / V,
                        V, scale, softcap, HAS_SOFTCAP, BLOCK)


@triton.jit
def _ce_bwd_kernel(X, stride_xn, stride_xv, Y, LSE, DX, stride_dn, stride_dv, G, stride_g,
                   Q, stride_q, V, ignore_index, scale, softcap, eps, z_coef,
                   HAS_SOFTCAP: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id``: dx from saved lse, loss grad G[row] and label-log-prob grad Q[row]."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row).to(tl.int64)
    valid = y != ignore_index
    lse = tl.load(LSE + row).to(tl.float32)
    g = tl.load(G + row * stride_g).to(tl.float32)
    coef_p = g * (1.0 + 2.0 * z_coef * lse)
    coef_y = -g * (1.0 - eps)
    if HAS_Q:
        q = tl.load(Q + row * stride_q).to(tl.float32)
        coef_p -= q
        coef_y += q
    _write_row_grad(X + row * stride_xn, stride_xv, DX + row * stride_dn, stride_dv, y, valid, lse,
                    coef_p, coef_y, -g * eps / V, V, scale, softcap, HAS_SOFTCAP, BLOCK)


def _config(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for a vocabulary of V on ``device``."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK.get(device.type, MAX_BLOCK["cuda"]))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def _row_arg(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A per-row upstream value as (tensor, row stride): a 0-d tensor broadcasts with stride 0."""
    return (t, 0) if t.dim() == 0 else (t, t.stride(0))


def kernel_options(*, ignore_index, logit_scale, softcap, label_smoothing, z_loss) -> dict:
    """The semantic options of :func:`launch_forward` / :func:`launch_backward` as Python numbers."""
    return dict(ignore_index=int(ignore_index), logit_scale=float(logit_scale),
                softcap=None if softcap is None else float(softcap),
                label_smoothing=float(label_smoothing), z_loss=float(z_loss))


def launch_forward(x: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor, *,
                   ignore_index: int, logit_scale: float, softcap, label_smoothing: float, z_loss: float,
                   logprobs: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                   dx: torch.Tensor | None = None) -> None:
    """Run the forward kernel on rows ``x`` [N, V] (any strides), labels ``y`` [N] contiguous.

    Writes ``loss`` [N], ``lse`` [N] (fp32, contiguous) and optionally ``logprobs`` [N]. With
    ``grad_scale`` (fp32, 0-d or [N]) also writes d(sum_i grad_scale_i * loss_i)/dx into ``dx``
    [N, V] — which may be ``x`` itself (each row is read fully before it is overwritten).
    """
    N, V = x.shape
    if N == 0:
        return
    block, warps = _config(V, x.device)
    write_grad = grad_scale is not None
    g, sg = _row_arg(grad_scale) if write_grad else (lse, 0)
    d = dx if write_grad else x
    _ce_fwd_kernel[(N,)](
        x, x.stride(0), x.stride(1), y, loss, lse, logprobs if logprobs is not None else lse,
        d, d.stride(0), d.stride(1), g, sg, V, ignore_index, float(logit_scale),
        float(softcap or 1.0), float(label_smoothing), float(z_loss),
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTH=label_smoothing > 0.0,
        WRITE_LP=logprobs is not None, WRITE_GRAD=write_grad,
        BLOCK=block, num_warps=warps)


def launch_backward(x: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, dx: torch.Tensor,
                    grad_loss: torch.Tensor, grad_logprobs: torch.Tensor | None = None, *,
                    ignore_index: int, logit_scale: float, softcap, label_smoothing: float,
                    z_loss: float) -> None:
    """Write d(sum_i g_i * loss_i + q_i * logprob_i)/dx into ``dx`` [N, V] (may alias ``x``).

    :param grad_loss: fp32 ``g``, 0-d (same for every row) or [N] (any stride).
    :param grad_logprobs: fp32 ``q`` [N] or None.
    """
    N, V = x.shape
    if N == 0:
        return
    block, warps = _config(V, x.device)
    g, sg = _row_arg(grad_loss)
    q, sq = _row_arg(grad_logprobs) if grad_logprobs is not None else (lse, 0)
    _ce_bwd_kernel[(N,)](
        x, x.stride(0), x.stride(1), y, lse, dx, dx.stride(0), dx.stride(1), g, sg, q, sq,
        V, ignore_index, float(logit_scale), float(softcap or 1.0), float(label_smoothing), float(z_loss),
        HAS_SOFTCAP=softcap is not None, HAS_Q=grad_logprobs is not None,
        BLOCK=block, num_warps=warps)


def _ce_forward(logits, labels, opts: dict, reduction: str, divisor):
    """``(out, lse [N] fp32)`` for ``logits [N, V]`` (any strides), ``labels [N]``: ``out`` the
    fp32 loss, 0-d (``loss.sum()``, over ``divisor`` for "mean") or ``[N]`` for "none"."""
    N = logits.shape[0]
    loss = new_buffer((N,), torch.float32, logits.device)
    lse = new_buffer((N,), torch.float32, logits.device)
    launch_forward(logits, labels, loss, lse, **opts)
    if reduction == "none":
        return loss, lse
    return (loss.sum() if divisor is None else loss.sum() / divisor), lse


def _ce_backward(grad_out, logits, labels, lse, opts: dict, reduction: str, divisor):
    """``d logits`` ``[N, V]`` (contiguous, logits' dtype) from the upstream ``grad_out`` of
    :func:`_ce_forward`'s ``out`` (0-d, or ``[N]`` for "none")."""
    g = grad_out.float()
    if reduction == "mean":
        g = g / divisor
    dlogits = new_buffer(logits.shape, logits.dtype, logits.device)
    launch_backward(logits, labels, lse, dlogits, g, **opts)
    return dlogits


class _CrossEntropy(torch.autograd.Function):
    """logits [N, V] (any strides), labels [N] -> fp32 loss (scalar, or [N] for "none"). The eager
    form; inside ``torch.compile`` the operators of :mod:`corept_kernels.ops.cross_entropy` run
    the same launches."""

    @staticmethod
    def forward(ctx, logits, labels, opts, reduction, divisor):
        out, lse = _ce_forward(logits, labels, opts, reduction, divisor)
        ctx.save_for_backward(logits, labels, lse, divisor)
        ctx.opts, ctx.reduction = opts, reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, divisor = ctx.saved_tensors
        dlogits = _ce_backward(grad_out, logits, labels, lse, ctx.opts, ctx.reduction, divisor)
        return dlogits, None, None, None, None


def _prepare(logits, labels, *, ignore_index, softcap, logit_scale, label_smoothing, reduction,
             num_items_in_batch, z_loss):
    """The checked arguments of the kernel path: ``(x [N, V], y [N] contiguous, divisor, opts)``."""
    ref.check_options(reduction=reduction, logit_scale=logit_scale, softcap=softcap,
                      label_smoothing=label_smoothing, z_loss=z_loss,
                      num_items_in_batch=num_items_in_batch)
    V = logits.shape[-1]
    x = logits if logits.dim() == 2 else logits.reshape(-1, V)
    y = labels.reshape(-1).contiguous()
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    divisor = ref.loss_divisor(y, ignore_index, reduction, num_items_in_batch, logits.device)
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    return x, y, divisor, opts


def _kernel_path(run, doc: str):
    """A function with :func:`cross_entropy`'s signature that checks its arguments and calls
    ``run(x [N, V], y [N], opts, reduction, divisor)``: the eager Function or the operator."""
    def path(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
             reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0) -> torch.Tensor:
        x, y, divisor, opts = _prepare(logits, labels, ignore_index=ignore_index, softcap=softcap,
                                       logit_scale=logit_scale, label_smoothing=label_smoothing,
                                       reduction=reduction, num_items_in_batch=num_items_in_batch, z_loss=z_loss)
        out = run(x, y, opts, reduction, divisor)
        return out.reshape(labels.shape) if reduction == "none" else out
    path.__doc__ = doc
    return path


_cross_entropy_triton = _kernel_path(
    lambda x, y, opts, reduction, divisor: _CrossEntropy.apply(x, y, opts, reduction, divisor),
    "The Triton path of :func:`cross_entropy` (same signature), always Triton.")
_cross_entropy_compiled = _kernel_path(
    lambda x, y, opts, reduction, divisor: torch.ops.corept_kernels.cross_entropy_fwd(
        x, y, divisor, reduction, **opts)[0],
    "The ``torch.compile`` form of the Triton path (the custom operators of corept_kernels.ops).")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                  reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` [..., V] (any float dtype, any strides) against ``labels`` [...].

    :param ignore_index: label value that contributes nothing (and is not counted by "mean").
    :param softcap: if set, the (scaled) logits become ``softcap * tanh(logits / softcap)`` (e.g.
        Gemma-2's final logit softcapping).
    :param logit_scale: the logits are multiplied by it first, in fp32 (e.g. ``1 /
        config.logits_scaling`` for Granite, ``config.logit_scale`` for Cohere).
    :param label_smoothing: ``eps``: loss = (1 - eps) * nll + eps * mean_v(-log p_v), as torch.
    :param reduction: "mean" (0.0 when all tokens are ignored), "sum" or "none" ([...] fp32).
    :param num_items_in_batch: int or 0-d tensor (any device): loss = sum / num_items_in_batch.
    :param z_loss: adds ``z_loss * lse**2`` per non-ignored token.
    :returns: fp32 loss. Gradient w.r.t. ``logits`` in the logits dtype.

    Runs the Triton kernels where :func:`corept_kernels.capabilities.dispatch` allows (CUDA, or
    CPU under ``TRITON_INTERPRET=1``), otherwise the pure-torch twin.
    """
    fn, _ = capabilities.dispatch("cross_entropy", logits, labels)
    return fn(logits, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
              label_smoothing=label_smoothing, reduction=reduction,
              num_items_in_batch=num_items_in_batch, z_loss=z_loss)


capabilities.register(capabilities.KernelInfo(
    name="cross_entropy", triton_fn=_cross_entropy_triton, reference_fn=ref.cross_entropy,
    compiled_fn=_cross_entropy_compiled,
    notes="chunked online logsumexp over V; logit scale, softcap, label smoothing, z-loss; saves lse only"))
