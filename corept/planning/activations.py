"""Per-token activation bytes of one decoder layer: what autograd saves, and what backward adds.

Notation (per token; ``N = batch * seq`` tokens): ``a`` activation dtype bytes (2 for bf16/fp16),
``H`` hidden, ``I`` intermediate, ``Hq = heads * head_dim``, ``Hkv = kv_heads * head_dim``,
``h`` heads, ``r`` LoRA rank, ``S`` sequence length.

**Saved for backward** by one corept-patched layer (measured with
``torch.autograd.graph.saved_tensors_hooks`` on CPU; ``tests/planning`` checks these against the
measurement, term by term):

* every ``[H]`` norm saves its input and fp32 rstd: ``a*H + 4`` each (2 norms in Llama/Qwen,
  4 in Gemma2/3);
* q/k/v/o LoRA linears: fused path (``lora_o``, a base bias added in the same call) saves its
  input (q/k/v share the normed input: ``a*H`` once) and ``x A^T`` in the adapter dtype (``p``
  bytes: fp32, peft's default adapters, so ``4*r``); peft's path (unpatched models) saves an fp32
  copy of its input and an fp32 ``x A^T``: ``4*in + 4*r``; a frozen linear saves nothing; full fine-tuning:
  an ``nn.Linear`` saves its input (shared);
* qk-norms (qwen3, gemma3): ``a*(Hq + Hkv) + 4*(h + kv_heads)``;
* attention, SDPA with FlashAttention (no mask, GQA native): q, k, v after RoPE, the output
  (shared with o_proj's input) and fp32 logsumexp: ``a*(2*Hq + 2*Hkv) + 4*h``; corept's varlen
  kernel (eager models whose attention corept patches) saves the same plus its device-built
  schedule, 24 bytes a token (2 orders of 3 int32 per document row; boundaries taken from the
  position ids give one row per token); eager (unpatched eager models) or
  the math fallback: copies of q and expanded k/v ``3*a*Hq``, the output ``a*Hq``, and per
  token ``S`` scores: fp32 softmax + probabilities (+ tanh output with softcap):
  ``(4 + a (+ a)) * h * S``;
* gated MLP, fused LoRA (``lora_mlp``): input, gate and up projections and the three ``x A^T``:
  ``a*H + 2*a*I + 3*p*r``; full fine-tuning adds the down projection's input ``a*I``; an MLP
  without adapters keeps only the gate/up projections ``2*a*I``. Long calls of the fused MLP
  (gate/up above ``corept_kernels.lora.tiled.MLP_TILE_MIN_BYTES``) run over row tiles that save
  only the input ``a*H``; one tile's projections (``MLP_TILE_BYTES``, x1.5 with ``h`` or ``dh``)
  are then a token-independent transient, and the output / ``dx`` buffer ``a*H`` per token.

**Backward working set** on top of the saved set, for the layer being differentiated:
``out`` (the recomputed layer output, corept checkpointing only) and ``dy``, both ``a*H``; then the
larger of the MLP phase and the attention phase. MLP, fused LoRA: ``dh = dy W_down`` ``a*I`` and
``dx`` with one base product in flight, ``a*I + a*H`` (``3*a*I + a*H`` when the activation's
backward is not in place). With adapters in another dtype than the activations (fp32 on bf16:
peft's numerics, which the fused kernels follow) every cast of an ``[N, width]`` activation to
the adapter dtype runs over row chunks of at most ``corept_kernels.lora.chunks.CHUNK_BYTES``:
a token-independent ``chunk_bytes`` (a chunk, its product and the cast back: about three chunks)
instead of per-token fp32 copies. Attention: MLP's saved set released; ``d(h1)`` ``a*H``,
``d(attn)`` ``a*Hq``, FlashAttention-2 backward: fp32 ``dq`` accumulator ``4*Hq``, ``dq``
``a*Hq``, GQA-expanded ``dk``/``dv`` ``2*a*Hq`` and their reduced copies ``2*a*Hkv``, ``4*h``.
The no-grad first forward holds ``3*a*H`` (input, residual, normed) and the MLP's projections
``3*a*I`` (+ ``chunk_bytes`` with mixed-dtype adapters).

The saved set is checked on CPU term by term (``tests/planning``). The backward and forward
transients are read off the kernels' code (``corept_kernels.lora.autograd``): on CPU the Triton
interpreter keeps its last launch's arguments alive and bf16 GEMMs allocate workspaces, so a CPU
memory trace cannot pin them to the byte; the H200 validation (``bench/plan_validate.py``) does.
"""
from __future__ import annotations

from dataclasses import dataclass

from corept.planning.shape import ModelShape

SCHEDULE_BYTES = 24  # per token: the varlen kernel's schedule rows (see the module docstring)
UNPATCHED_FACTOR = 2.4  # measured on an 8B dense layer: unpatched (HF norms/rope/MLP + peft LoRA) it saves ~2.3x


@dataclass(frozen=True)
class LayerBytes:
    """One layer's activation bytes: ``per_token + per_token_seq * S`` (multiply by ``N``)."""

    saved: dict           # term -> (per_token, per_token_per_seq) of the saved set
    mlp_saved: float      # per-token part of ``saved`` released after the MLP backward
    bwd_mlp: float        # per-token extra during the MLP backward
    bwd_attn: float       # per-token extra during the attention backward (after the release)
    bwd_attn_seq: float   # per-token-per-seq extra during the attention backward
    fwd: float            # per-token no-grad forward working set (checkpointed first pass)
    fwd_seq: float
    chunk_bytes: float = 0.0  # token-independent transients: row chunks of adapter-dtype casts

    def saved_per_token(self, seq: int) -> float:
        return sum(lin + quad * seq for lin, quad in self.saved.values())

    def backward_extra(self, seq: int, recomputed_out: bool, a: int, hidden: int) -> float:
        """Per-token bytes live on top of the saved set at the peak of this layer's backward."""
        base = a * hidden * (2 if recomputed_out else 1)
        return base + max(self.bwd_mlp, self.bwd_attn + self.bwd_attn_seq * seq - self.mlp_saved)

    def forward_extra(self, seq: int) -> float:
        return self.fwd + self.fwd_seq * seq


def _dims(shape: ModelShape) -> tuple[int, int, int, int]:
    lin = shape.layer.linears
    H = shape.hidden
    Hq = lin["q_proj"].out_features if "q_proj" in lin else shape.heads * shape.head_dim
    Hkv = lin["k_proj"].out_features if "k_proj" in lin else shape.kv_heads * shape.head_dim
    I = lin["gate_proj"].out_features if shape.layer.standard else shape.intermediate  # noqa: E741
    return H, Hq, Hkv, I


def projection_paths(shape: ModelShape, method: str) -> dict:
    """``{proj: "fused" | "peft" | "frozen" | "trainable"}`` for q/k/v/o and the ``mlp`` as a whole."""
    lin = shape.layer.linears
    if method == "full":
        return {p: "trainable" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")}
    paths = {}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if p not in lin or p not in shape.lora_targets:
            paths[p] = "frozen"
        else:
            paths[p] = "fused" if shape.patched else "peft"  # a base bias rides on the fused path
    mlp = [p for p in ("gate_proj", "up_proj", "down_proj") if p in lin]
    targeted = [p for p in mlp if p in shape.lora_targets]
    if not targeted:
        paths["mlp"] = "frozen"
    elif shape.patched and len(targeted) == 3:
        paths["mlp"] = "fused"
    else:
        paths["mlp"] = "peft"
    return paths


def layer_bytes(shape: ModelShape, method: str, r: int, a: int, attention: str, p: int = 4,
                tokens: int | None = None) -> LayerBytes:
    """The formulas of the module docstring for ``shape``'s first decoder layer.

    :param tokens: tokens per call (``batch * seq``), to tell whether the fused MLP runs tiled;
        ``None``: untiled.
    :param method: ``lora``/``qlora`` (adapters) or ``full``.
    :param attention: ``flash`` (SDPA on a FlashAttention GPU), ``varlen`` (corept's varlen kernel)
        or ``eager`` (eager, or the math fallback of GPUs without FlashAttention).
    :param p: adapter dtype bytes (4: peft's fp32 adapters, what ``corept.get_peft_model`` makes).
    """
    H, Hq, Hkv, I = _dims(shape)
    h, kv, layer = shape.heads, shape.kv_heads, shape.layer
    paths = projection_paths(shape, method)
    lin = layer.linears
    saved: dict = {"norms": ((a * H + 4) * layer.norms, 0.0)}
    shared_input = any(paths[p] in ("fused", "trainable") for p in ("q_proj", "k_proj", "v_proj"))
    shared_input = shared_input or (a == 4 and any(paths[p] == "peft" for p in ("q_proj", "k_proj", "v_proj")))
    saved["qkv_input"] = (a * H if shared_input else 0.0, 0.0)
    proj, pb = 0.0, p
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if paths[p] == "fused":
            proj += pb * r
        elif paths[p] == "peft":
            proj += (0 if a == 4 else 4 * lin[p].in_features) + 4 * r
    saved["lora_products"] = (proj, 0.0)
    if layer.qk_norm:
        saved["qk_norm"] = (a * (Hq + Hkv) + 4 * (h + kv), 0.0)
    flash_like = attention in ("flash", "varlen")
    if flash_like:
        saved["attention"] = (a * (2 * Hq + 2 * Hkv) + 4 * h + (SCHEDULE_BYTES if attention == "varlen" else 0), 0.0)
    else:
        saved["attention"] = (4 * a * Hq, (4 + a + (a if layer.attn_softcap else 0)) * h)
    mlp, mixed = paths["mlp"], pb != a  # mixed: the adapter branch runs in another dtype
    if mlp == "fused":
        mlp_saved = a * H + 2 * a * I + 3 * pb * r
        bwd_mlp = a * I + a * H
    elif mlp == "trainable":
        mlp_saved = a * H + 3 * a * I
        bwd_mlp = 3 * a * I + a * H
    elif mlp == "frozen":
        mlp_saved = 2 * a * I
        bwd_mlp = 3 * a * I + a * H
    else:  # peft's LoRA linears around corept's (or HF's) activation
        mlp_saved = (0 if a == 4 else 4 * (2 * H + I)) + 2 * a * I + 12 * r
        bwd_mlp = 3 * a * I + a * H + 4 * I
    if shape.experts_per_token and shape.patched:
        mlp_saved, bwd_mlp, moe_fwd = _routed_experts(shape, a, r, pb)
    elif not layer.standard:
        mlp_saved, bwd_mlp = a * H + 3 * a * I, 3 * a * I + a * H
    tiled = mlp == "fused" and layer.standard and tokens is not None and tokens * 2 * a * I > _mlp_tile_bytes()[0]
    if tiled:
        mlp_saved, bwd_mlp = a * H, a * H
    saved["mlp"] = (mlp_saved, 0.0)
    gqa = 2 * a * Hq if Hq != Hkv else 0
    bwd_attn = a * H + a * Hq + (4 * Hq + a * Hq + gqa + 2 * a * Hkv + 4 * h if flash_like else a * Hq)
    bwd_attn_seq = 0.0 if flash_like else (a + 4) * h
    fwd = a * 3 * H + (a * H if tiled else 3 * a * I)
    if shape.experts_per_token and shape.patched:
        fwd = a * 3 * H + moe_fwd
    fused_any = mlp == "fused" or paths.get("o_proj") == "fused"
    chunk_bytes = 3.0 * _lora_chunk_bytes() if mixed and fused_any else 0.0
    if tiled:
        chunk_bytes += 1.5 * _mlp_tile_bytes()[1]
    fwd_seq = 0.0 if flash_like else (4 + 2 * a) * h
    if not shape.patched:
        saved = {k: (lin_ * UNPATCHED_FACTOR, q * UNPATCHED_FACTOR) for k, (lin_, q) in saved.items()}
        mlp_saved *= UNPATCHED_FACTOR
    return LayerBytes(saved=saved, mlp_saved=mlp_saved, bwd_mlp=bwd_mlp, bwd_attn=bwd_attn,
                      bwd_attn_seq=bwd_attn_seq, fwd=fwd, fwd_seq=fwd_seq, chunk_bytes=chunk_bytes)


def _routed_experts(shape: ModelShape, a: int, r: int, p: int) -> tuple[float, float, float]:
    """``(saved, backward extra, no-grad forward)`` per token of corept's experts forward
    (:mod:`corept.components.experts`) with LoRA on the stacked experts, for ``k`` routed rows per
    token of an expert of width ``W`` (measured with saved_tensors_hooks on CPU, term by term:
    ``tests/planning``):

    * the router: its input ``a*H`` and fp32 probabilities ``4*E``; the top-k indices and weights,
      the sort order and the token of each row: ``k*(8 + 8 + a)``;
    * the gathered rows ``a*k*H`` (gate/up's input), gate/up's output ``2*a*k*W`` (the default
      SwiGLU saves just that; a module's own gate, e.g. gpt-oss's clamped one, saves its
      elementwise intermediates too: ``7*a*k*W`` as measured), down's input ``a*k*W``, down's
      output ``a*k*H`` (for the routing weights' gradient) and the weighted rows ``a*k*H``;
    * each LoRA branch's ``x A^T``: ``2*k*r`` in the adapters' compute dtype.

    Backward: ``dy`` rows, ``d(gate_up)``, ``d(act)`` and ``dx`` rows: ``a*k*(2H + 3W)``. The
    checkpointed first pass holds the rows, gate/up and its output: ``a*k*(2H + 3W)``.
    """
    H, k, W, E = shape.hidden, shape.experts_per_token, shape.expert_width, shape.experts
    gate = 2 * W if shape.expert_default_gate else 7 * W
    saved = a * H + 4 * E + k * (16 + a) + a * k * (3 * H + gate + W) + 2 * k * r * min(p, a)
    return float(saved), float(a * k * (2 * H + 3 * W) + a * H), float(a * k * (2 * H + 3 * W))


def _kernel_constant(module: str, name: str, fallback: int) -> float:
    """A byte bound the fused kernels define (``corept_kernels.<module>.<name>``), read from them so
    the planner follows their changes; ``fallback`` (its value as of corept-kernels 0.1) where the
    kernels are not installed: planning needs no kernels."""
    import importlib

    try:
        return float(getattr(importlib.import_module(f"corept_kernels.{module}"), name))
    except ImportError:
        return float(fallback)


def _lora_chunk_bytes() -> float:
    """The fused LoRA kernels' row-chunk bound for adapter-dtype casts."""
    return _kernel_constant("lora.chunks", "CHUNK_BYTES", 64 << 20)


def _mlp_tile_bytes() -> tuple[float, float]:
    """The fused MLP's tiling threshold and tile size in bytes."""
    return (_kernel_constant("lora.tiled", "MLP_TILE_MIN_BYTES", 2 << 30),
            _kernel_constant("lora.tiled", "MLP_TILE_BYTES", 512 << 20))


def loss_chunk_tokens(n_tokens: int, hidden: int, vocab: int, dtype_bytes: int) -> int:
    """Tokens per chunk of corept's fused linear cross-entropy: its own ``default_chunk_size``
    (chunk logits ~ the size of the hidden states, or up to its byte budget, a power of two)."""
    import torch
    from corept_kernels.fused_linear_ce import default_chunk_size

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    return int(default_chunk_size(n_tokens, hidden, vocab, dtype))
