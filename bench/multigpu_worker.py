"""One multi-GPU benchmark part, run by ``torchrun`` from bench/multigpu.py (never imported).

Usage: ``torchrun --standalone --nproc-per-node N bench/multigpu_worker.py SPEC.json``. The spec:
``{"part", "engine": "single"|"ddp"|"fsdp", "model", "batch", "seq", "steps", "warmup", "rank",
"device": "cuda"|"cpu", "seed", "record": PATH}``.

* ``single`` / ``ddp``: every rank builds the same seeded random bf16 model directly on its GPU,
  ``corept.patch`` + ``corept.get_peft_model`` (LoRA r on the 7 projections, corept offloaded
  checkpointing), DDP(``find_unused_parameters=False``) when N > 1; random tokens per rank.
* ``fsdp``: the model is built on the ``meta`` device (buffers real), patched and LoRA-wrapped
  there, sharded with ``corept.distributed.fsdp.shard`` (FSDP2, one unit per decoder layer),
  then ``to_empty`` allocates **only this rank's shards** on its GPU and each shard is filled
  with random values (no full copy ever exists on one device).

Per step: forward + backward + AdamW step timed between ``synchronize`` calls; tokens/s counts
every rank's tokens (global). Per-rank peak ``torch.cuda.max_memory_allocated`` (stats reset after
setup) is gathered on rank 0, which rewrites ``record`` after every step, so a killed run keeps
what it measured. CPU (dry run): gloo, memory is each process's peak RSS.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback

GIB = 2**30
HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERSIONED = ("torch", "triton", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "corept",
             "corept-kernels")


def _variants():
    spec = importlib.util.spec_from_file_location("corept_bench_e2e_variants", os.path.join(HERE, "e2e_variants.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LLAMA70 = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8)  # Llama-3.1-70B; head_dim, vocab, rope as Llama-3.1-8B


def model_config(name: str):
    """The transformers config of ``name``: bench/e2e_variants.py's models, plus ``llama-3.1-70b``
    and ``llama-3.1-70b-2l`` (its 2-layer cut, real widths)."""
    import copy

    from transformers import AutoConfig

    models = _variants().MODELS
    if name.startswith("llama-3.1-70b"):
        kw = dict(models["llama-3.1-8b"], **LLAMA70)
        if name.endswith("-2l"):
            kw["num_hidden_layers"] = 2
    else:
        kw = models[name]
    kw = copy.deepcopy(kw)  # transformers edits rope dicts in place
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def lora(model, rank: int):
    import corept

    corept.patch(model)
    return corept.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS),
                                 use_gradient_checkpointing="corept", random_state=3407)


def build_replica(spec, device, torch):
    """Seeded random model built on ``device``, patched, LoRA-wrapped (same on every rank)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(spec["model"]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    return lora(model, spec["rank"])


def build_sharded(spec, device, torch, rank: int):
    """Meta-device model, LoRA, FSDP2 shards, then only this rank's shards allocated and filled."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from corept.distributed.fsdp import shard

    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE tables computed for real
        model = AutoModelForCausalLM.from_config(model_config(spec["model"]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model = lora(model, spec["rank"])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shard(model)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(spec["seed"] * 1000 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p._local_tensor if isinstance(p, DTensor) else p
            if "lora_B" in name:
                local.zero_()
            elif "norm" in name:
                local.fill_(1.0)
            elif "lora_A" in name:
                local.normal_(0.0, 1.0 / spec["rank"], generator=g)
            else:
                local.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].to(b.device))
    return model


def peak_memory(torch, cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def predicted_gib(spec, world: int) -> float:
    """What ``corept plan --gpu h200 --gpus N --distributed ...`` predicts for this part (per GPU)."""
    from corept.planning import estimate, model_shape

    engine = spec["engine"]
    est = estimate(model_shape(model_config(spec["model"])), method="lora", seq=spec["seq"], batch=spec["batch"],
                   r=spec["rank"], gpu="h200", gpus=world, distributed=None if engine == "single" else engine)
    return round(est.peak_allocated / GIB, 3)


def train(spec, rec, flush, torch, dist, rank: int, world: int) -> None:
    cuda = spec["device"] == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    if spec["engine"] == "fsdp":
        model = build_sharded(spec, device, torch, rank)
        wrapped = model
    else:
        model = build_replica(spec, device, torch)
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[local] if cuda else None, find_unused_parameters=False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        rec["after_setup_gib_rank0"] = round(torch.cuda.memory_allocated() / GIB, 3)
        torch.cuda.reset_peak_memory_stats()
    rec["setup_s"] = round(time.perf_counter() - t0, 1)
    import corept

    from corept_kernels import all_kernels, can_run

    rec["corept_applied"] = dict(corept.report(model).applied)  # as seen at patch time (fsdp: on meta)
    rec["triton_at_runtime"] = sorted(k for k in all_kernels() if can_run(k, device)[0])  # decided per call
    rec["trainable_params"] = int(sum(p.numel() for p in trainable))  # DTensor.numel() is the global count
    vocab, b, s = model.config.vocab_size, spec["batch"], spec["seq"]
    gen = torch.Generator().manual_seed(spec["seed"] * 7919 + rank)
    rec.update(losses=[], step_s=[], peak_gib_per_rank=[])
    for i in range(spec["warmup"] + spec["steps"]):
        x = torch.randint(0, vocab, (b, s), generator=gen).to(device)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        out = wrapped(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().float()
        del out
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        dist.all_reduce(loss)
        times = [None] * world
        dist.all_gather_object(times, (dt, peak_memory(torch, cuda)))
        rec["step_s"].append(round(max(t for t, _ in times), 4))
        rec["losses"].append(float(loss) / world)
        rec["peak_gib_per_rank"] = [round(m, 3) for _, m in times]
        rec["steps_done"] = i + 1
        flush()
        if rank == 0:
            print(f"  step {i + 1}: loss {rec['losses'][-1]:.4f} {rec['step_s'][-1]:.3f}s "
                  f"peak {rec['peak_gib_per_rank']} GiB", flush=True)
    timed = rec["step_s"][spec["warmup"]:] or rec["step_s"][-1:]
    rec.update(tokens_per_s=round(world * b * s * len(timed) / sum(timed), 1),
               tokens_per_s_per_gpu=round(b * s * len(timed) / sum(timed), 1),
               median_step_s=statistics.median(timed), peak_gib_max=max(rec["peak_gib_per_rank"]),
               loss0=rec["losses"][0], loss=rec["losses"][-1])
    if not all(math.isfinite(v) for v in rec["losses"]):
        rec["error"] = "non-finite loss"


def main(argv) -> int:
    import torch
    import torch.distributed as dist

    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    cuda = spec["device"] == "cuda"
    if cuda:  # before the process group: NCCL's barrier/all_gather_object use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rec = {k: spec[k] for k in ("part", "engine", "model", "batch", "seq", "steps", "warmup", "rank", "device")}
    rec.update(gpus=world, date=datetime.date.today().isoformat(), versions=versions(),
               gpu=torch.cuda.get_device_name(0) if cuda else None, shape=f"{spec['batch']}x{spec['seq']} per GPU",
               nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))

    def flush():
        if rank == 0:
            tmp = spec["record"] + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(rec, fh, indent=1)
            os.replace(tmp, spec["record"])

    try:
        rec["predicted_peak_gib"] = predicted_gib(spec, world)
    except Exception as exc:  # noqa: BLE001 - the prediction is extra information only
        rec["predicted_peak_gib_error"] = f"{type(exc).__name__}: {exc}"[:300]
    flush()
    try:
        train(spec, rec, flush, torch, dist, rank, world)
    except Exception as exc:  # noqa: BLE001 - a failure is a record
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
        rec["oom"] = "out of memory" in str(exc).lower()
        rec["traceback"] = traceback.format_exc()[-3000:]
        traceback.print_exc()
    flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from corept.distributed.launcher import exit_skipping_teardown

    exit_skipping_teardown(main(sys.argv[1:]))  # everything is written and the process group destroyed
