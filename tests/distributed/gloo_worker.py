"""Distributed scenarios on CPU with the gloo backend; run by ``torchrun`` from test_gloo.py, never imported.

Usage: ``torchrun --nproc-per-node 2 gloo_worker.py OUT_DIR SCENARIO[,SCENARIO...] [MODEL_FOLDER]``.

Every scenario trains a tiny corept-patched Llama (kernels through the Triton interpreter when
``TRITON_INTERPRET=1``) on one global batch ``[2 * world, 16]``: each rank takes its own rows, the
distributed engine reduces the gradients, and the result is compared on every rank with one
process training an identical model on the whole batch. Rank 0 writes ``OUT_DIR/<scenario>.json``:
max abs/ref differences of the loss and of every gradient, the same difference for rank 0's local
gradient alone (the control: what an unreduced gradient would give), and what the fused loss
kernel was handed (``weight_seen``). An exception is recorded as ``error`` and the next scenario
runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import corept
import corept.components.head as loss_module
from corept.distributed import fsdp
from corept.tiny import tiny_model

SEQ, ROWS_PER_RANK, VOCAB = 16, 2, 257
SEEN: list = []


def _spy(orig):
    def spy(hidden, weight, targets, **kw):
        SEEN.append({"type": type(weight).__name__, "shape": list(weight.shape)})
        return orig(hidden, weight, targets, **kw)
    return spy


def global_batch(world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (ROWS_PER_RANK * world, SEQ), generator=g)


def build(mode: str, folder: str | None):
    """(model, description) for ``mode`` in lora / full / qlora, identical on every call."""
    if mode == "qlora":
        model, _ = corept.load(folder, max_seq_length=SEQ, load_in_4bit=True, dtype="bf16",
                               bnb_4bit_quant_storage="auto")
    else:
        model = tiny_model("llama", seed=0)
        corept.patch(model)
    if mode == "full":
        from corept.training.trainers import enable_full_checkpointing

        enable_full_checkpointing(model, "corept")
    else:
        model = corept.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="corept")
        with torch.no_grad():  # trained-looking adapters, so the LoRA kernels' gradients matter
            g = torch.Generator().manual_seed(5)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def grads_of(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, ids) -> float:
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None, "expected corept's fused linear cross-entropy path"
    out.loss.backward()
    return out.loss.detach().float()


def compare(got: dict, ref: dict) -> dict:
    """Per-name max |got - ref| / max |ref| and the worst of them."""
    missing = sorted(set(ref) - set(got))
    rel = {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12))
           for n in ref if n in got}
    return {"missing": missing, "worst": max(rel.values()) if rel else None,
            "worst_name": max(rel, key=rel.get) if rel else None, "count": len(rel)}


_REFERENCES: dict = {}


def reference(mode: str, folder, ids, rank: int):
    """Loss + grads of one process on the whole batch, and rank ``rank``'s local grads alone (cached per mode)."""
    if mode not in _REFERENCES:
        _REFERENCES[mode] = _reference(mode, folder, ids, rank)
    return _REFERENCES[mode]


def _reference(mode: str, folder, ids, rank: int):
    ref = build(mode, folder)
    loss = step(ref, ids)
    whole = grads_of(ref)
    ref.zero_grad(set_to_none=True)
    step(ref, ids[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK])
    local = grads_of(ref)
    return float(loss), whole, local


def check_saved(model, mode: str, folder, out_dir: str, scenario: str, rank: int) -> dict | None:
    """Save the sharded model (collective), reload the files on rank 0 and compare with a fresh build."""
    from safetensors.torch import load_file

    from corept.distributed.saving import save_sharded

    target = os.path.join(out_dir, scenario + "-saved")
    save_sharded(model, None, target, method="lora" if mode == "lora" else "merged_16bit")
    if rank != 0:
        return None
    files = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
    saved = {k: v for f in files for k, v in load_file(os.path.join(target, f)).items()}
    fresh = build(mode, folder)
    if mode == "lora":
        want = {n.replace(".default", ""): p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    else:
        want = dict(fresh.state_dict())
    same = [k for k in want if k in saved and torch.equal(saved[k], want[k].to(saved[k].dtype))]
    return {"files": files, "saved": len(saved), "expected": len(want), "equal": len(same)}


def run(scenario: str, folder, rank: int, world: int, out_dir: str) -> dict:
    engine, mode, *rest = scenario.split("-")
    head = rest[0] if rest else "root"
    ids = global_batch(world)
    mine = ids[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]
    ref_loss, whole, local = reference(mode, folder, ids, rank)
    model = build(mode, folder)
    rec = {"scenario": scenario, "world": world}
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = head == "findunused"
        wrapped = DDP(model, find_unused_parameters=unused)
        for _ in range(2):  # twice: DDP's per-iteration bookkeeping must reset cleanly
            wrapped.zero_grad(set_to_none=True)
            loss = step(wrapped, mine)
        got = grads_of(model)
    else:
        fsdp.shard(model, head=head)
        lm_head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head
        shards = [p._local_tensor for p in model.parameters() if hasattr(p, "_local_tensor")]
        rec["local_numel"] = sum(t.numel() for t in shards)  # this rank's shards (FSDP2 pads dim 0)
        rec["one_row_per_tensor"] = sum(t[0].numel() for t in shards if t.dim() and t.shape[0])
        rec["head_weight_outside_forward"] = {"type": type(lm_head.weight).__name__,
                                             "local_shape": list(getattr(lm_head.weight, "_local_tensor",
                                                                         lm_head.weight).shape)}
        SEEN.clear()
        loss = step(model, mine)
        rec["weight_seen"] = list(SEEN)
        got = fsdp.full_grads(model)
        if mode != "qlora":
            rec["saved"] = check_saved(model, mode, folder, out_dir, scenario, rank)
    dist.all_reduce(loss)
    rec["loss"], rec["ref_loss"] = float(loss) / world, ref_loss
    rec["grads"] = compare(got, whole)
    rec["control_local_vs_whole"] = compare(local, whole)["worst"]
    return rec


def main(argv: list[str]) -> int:
    out, scenarios = argv[0], argv[1].split(",")
    folder = argv[2] if len(argv) > 2 else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    loss_module.fused_linear_cross_entropy = _spy(loss_module.fused_linear_cross_entropy)  # this process only
    for scenario in scenarios:
        t0 = time.perf_counter()
        try:
            rec = run(scenario, folder, rank, world, out)
        except Exception as exc:  # noqa: BLE001 - one failing scenario must not hide the others
            rec = {"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        if rank == 0:
            with open(os.path.join(out, scenario + ".json"), "w", encoding="utf-8") as fh:
                json.dump(rec, fh, indent=1)
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a failed collective can leave the group unusable
            break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from corept.distributed.launcher import exit_skipping_teardown

    exit_skipping_teardown(main(sys.argv[1:]))  # everything is written and the process group destroyed
