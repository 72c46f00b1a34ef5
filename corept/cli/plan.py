"""``corept plan``: will it fit? Peak GPU memory by component, or the largest config that fits.

Reads the model's config only (no weights). With ``--max-seq-length`` and ``--batch-size`` it
estimates that configuration (exit 1 and the smallest changes that would fit when it does not);
otherwise it recommends the longest sequence, batch and rank that fit with the margin, and the
gradient accumulation for ``--target-batch``. Both VRAM and the pinned host RAM of offloaded
checkpoints must fit (the host's RAM is detected, or ``--host-ram GIB``). Every size is in GiB.
Exit 2 on errors (unknown GPU, unreadable config, nothing fits at all).
"""
from __future__ import annotations

import json

from corept.planning.estimate import CHECKPOINTING, DEFAULT_MARGIN, METHODS, OPTIMS
from corept.planning.gpus import GIB, GPUS
from corept.planning.host import HOST_FRACTION, HOST_RESERVE_GIB

HELP = "plan GPU memory: what fits (seq, batch, LoRA rank) for a model, method and GPU, from the config"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="local folder, config.json, HF cache/hub id, plugin alias or a "
                                                  "model a plugin declares (answered offline; `corept plugins` lists aliases and known models)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="required unless --load-in-4bit: lora (16-bit base), qlora (4-bit base) or full")
    p.add_argument("--load-in-4bit", action="store_true", help="same as --method qlora (then --method may be left out)")
    p.add_argument("--max-seq-length", type=int, default=None, help="sequence length (default: searched)")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: searched)")
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default: 64 / 32 / 16 by model size)")
    p.add_argument("--optim", choices=OPTIMS, default="adamw")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default="corept")
    p.add_argument("--gpu", default=None, help=f"one of {', '.join(GPUS)} (default: the detected GPU)")
    p.add_argument("--vram", type=float, default=None, metavar="GIB",
                   help="usable GPU memory in GiB (2**30 bytes, as torch reports it) instead of --gpu")
    p.add_argument("--host-ram", type=float, default=None, metavar="GIB",
                   help="RAM of the training machine in GiB, all of it available (default: this machine's, "
                        f"detected); pinned host RAM may use min(available, {HOST_FRACTION:.0%}% of it) - "
                        f"{HOST_RESERVE_GIB:g} GiB per process")
    p.add_argument("--target-batch", type=int, default=16, help="effective batch for grad accumulation (default 16)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs training together, one process each (default 1); "
                                                       "every figure is then per GPU")
    p.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="with --gpus N: ddp (a replica per GPU, the default) or fsdp (FSDP2 shards)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"fraction of VRAM kept free (default {DEFAULT_MARGIN})")
    p.add_argument("--json", action="store_true", help="print JSON (sizes in GiB)")
    p.add_argument("--trust-remote-code", action="store_true")
    _usage_method_required(p)


def _usage_method_required(p) -> None:
    """argparse prints ``[--method ...]`` as optional; it is required unless ``--load-in-4bit``.

    (``required=True`` would reject ``--load-in-4bit`` alone, and a required mutually exclusive
    group would reject the consistent ``--method qlora --load-in-4bit``.)
    """
    usage = p.format_usage()
    opt, alt = f"[--method {{{','.join(METHODS)}}}]", " [--load-in-4bit]"
    if "\x1b" in usage or not usage.startswith("usage: ") or opt not in usage or alt not in usage:
        return  # an argparse that formats differently: keep its usage (the help text still says it)
    required = "(" + opt[1:-1] + " | --load-in-4bit)"
    p.usage = usage[len("usage: "):].rstrip("\n").replace(alt, "").replace(opt, required)


def _notes(est) -> dict:
    m, d, g = est.model, est.details, lambda b: f"{b / GIB:.2f}"
    if est.method == "qlora":
        w = f"nf4 + double quant: {m.n_quantized / 1e9:.2f}B params ~0.52 B; {m.n_unquantized / 1e9:.2f}B at 2 B"
    else:
        w = f"{m.n_params / 1e9:.2f}B params x {2 if est.dtype != 'fp32' else 4} B ({est.dtype})"
    if est.sharding.mode == "fsdp":
        w += f", sharded over {est.sharding.gpus} GPUs"
    if est.method == "full":
        t = f"none extra: the {m.n_params / 1e9:.2f}B weights themselves train"
    else:
        t = f"LoRA r{est.r}: {d['n_trainable'] / 1e6:.1f}M params x 4 B (fp32 adapters)"
    if d["offloaded"]:
        ck = f"offloaded: {g(est.host_pinned)} GiB in pinned host RAM" + (
            f" per process ({g(est.host_pinned_total)} GiB on the host)" if est.sharding.gpus > 1 else "")
    elif est.checkpointing == "none":
        ck = "no checkpointing: every layer's saved activations"
    else:
        ck = f"{m.layers} layer inputs [B,S,H] kept on the GPU"
    return {
        "weights": w, "trainable_params": t,
        "optimizer_states": "AdamW: 2 states per trainable param (+1 temp in the step)" if est.optim == "adamw"
        else "8-bit AdamW (bnb)",
        "gradients": "trainable params' grads (backward -> step)", "checkpoints": ck,
        "layer_working_set": f"one layer's recompute + backward ({d['attention']} attention)",
        "loss": f"fused CE: {d['loss_chunk_tokens']} tokens x {m.vocab} logits per chunk + d hidden",
        "hidden_states": "embedding output / final norm in and out",
        "workspace": "cuBLAS workspace, RoPE tables, ids and labels",
        "distributed_buffers": {None: "", "ddp": "DDP gradient buckets",
                                "fsdp": "gathered units (root + 2 layers) and unsharded grads"}[est.sharding.mode],
    }


def _auto_lines(est) -> list[str]:
    """What training's default ``--gradient-checkpointing auto`` would do at this shape (one GPU)."""
    if est.sharding.mode is not None:
        return []
    from corept.planning.recompute import keep_plan

    kp = keep_plan(est.model, est.gpu, method=est.method, seq=est.seq, batch=est.batch, r=est.r or 16)
    what = ("keeps every layer's activations (no recompute)" if kp.keep_layers == kp.layers else
            "recomputes every layer (offloaded)" if kp.keep_layers == 0 else
            f"keeps the last {kp.keep_layers} of {kp.layers} layers' activations, recomputes the rest")
    return [f"{'checkpointing auto':26s} {kp.required_gib:7.2f}   {what} (budget {kp.budget_gib:.2f} GiB; "
            f"all kept {kp.all_kept_gib:.2f}, all recomputed {kp.all_recomputed_gib:.2f})"]


def render(p) -> str:
    """The human table of a :class:`corept.planning.Plan`."""
    est, m = p.estimate, p.estimate.model
    g = lambda b: f"{b / GIB:7.2f}"  # noqa: E731
    lines = [f"model:  {m.name}  ({m.model_type}; plugin {m.plugin or 'none'}; {m.source})",
             f"config: {est.method}" + (f"  r {est.r}" if est.method != "full" else "") +
             f"  optim {est.optim}  checkpointing {est.checkpointing}  seq {est.seq}  batch {est.batch}"
             f"  dtype {est.dtype}",
             f"GPU:    {est.gpu.name} - {est.gpu.label} ({est.gpu.usable_gib:.1f} GiB usable)"
             + ("" if est.sharding.mode is None else f"; {est.sharding.label}"), "",
             f"{'component':26s} {'GiB':>7s}   note"]
    notes = _notes(est)
    for k, v in est.components.items():
        lines.append(f"{k.replace('_', ' '):26s} {g(v)}   {notes.get(k, '')}")
    lines += ["-" * 72,
              f"{'peak allocated':26s} {g(est.peak_allocated)}   phase: {est.peak_phase} "
              f"(predicts torch.cuda.max_memory_allocated)",
              f"{'allocator slack':26s} {g(est.allocator_slack)}   {est.slack:.0%} fragmentation margin",
              f"{'CUDA context':26s} {g(est.cuda_context)}   outside the allocator's counters",
              f"{'required':26s} {g(est.required)}   budget {est.budget / GIB:.2f} GiB "
              f"({est.gpu.usable_gib:.1f} GiB - {est.margin:.0%} margin): "
              + ("FITS" if est.vram_fits else "DOES NOT FIT")]
    lines += _host_lines(est) + _auto_lines(est)
    if not est.fits:
        why = [w for w, bad in (("VRAM", not est.vram_fits), ("pinned host RAM", not est.host_fits)) if bad]
        lines.append(f"{'verdict':26s} DOES NOT FIT ({' and '.join(why)})")
    if p.recommendation:
        r = p.recommendation
        lines += ["", f"recommended: max_seq_length {r['max_seq_length']}, batch_size {r['batch_size']}, "
                      f"gradient_accumulation_steps {r['grad_accum']}" + (f", r {r['r']}" if r['r'] else "") +
                      f" (effective batch {r['effective_batch']}"
                      + (f" over {r['gpus']} GPUs)" if r.get("gpus", 1) > 1 else ")")]
        if p.longest_seq_at_batch_1:
            lines.append(f"longest sequence at batch 1: {p.longest_seq_at_batch_1} tokens")
    if p.suggestions:
        lines += ["", "would fit with (one change each, smallest first):"] + [f"  - {s}" for s in p.suggestions]
    for n in est.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _host_lines(est) -> list[str]:
    """The pinned host RAM line: needed vs the host's budget, and where the budget came from."""
    host, budget, need = est.host, est.host_budget, est.host_pinned_total
    what = "offloaded layer inputs (CPU side)" if need else "nothing offloaded"
    if host is None:
        return [f"{'pinned host RAM':26s} {need / GIB:7.2f}   {what}"] if need else []
    if budget is None:
        return [f"{'pinned host RAM':26s} {need / GIB:7.2f}   {what}; {host.describe(est.sharding.gpus)}"]
    verdict = "FITS" if est.host_fits else (
        f"DOES NOT FIT: needs {need / GIB:.2f} GiB of pinned host RAM, {budget / GIB:.2f} GiB available for it")
    return [f"{'pinned host RAM':26s} {need / GIB:7.2f}   {what}; {host.describe(est.sharding.gpus)}: {verdict}"]


def run(args) -> int:
    from corept.planning import plan

    method = args.method or ("qlora" if args.load_in_4bit else None)
    if method is None:
        from corept.errors import InvalidOptionsError

        raise InvalidOptionsError(f"--method is required: one of {', '.join(METHODS)} (or --load-in-4bit)")
    if args.load_in_4bit and method != "qlora":
        from corept.errors import InvalidOptionsError

        raise InvalidOptionsError(f"--load-in-4bit contradicts --method {method}: 4-bit bases train with qlora")
    p = plan(args.model, method, gpu=args.gpu, vram=args.vram, max_seq_length=args.max_seq_length,
             batch_size=args.batch_size, r=args.r, optim=args.optim, checkpointing=args.checkpointing,
             target_batch=args.target_batch, margin=args.margin, trust_remote_code=args.trust_remote_code,
             gpus=args.gpus, distributed=args.distributed, host_ram=args.host_ram)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(render(p))
    return 0 if p.fits else 1
