"""Validate corept's VRAM planner against measured peaks on one GPU, and emulate a 24 GB card.

Run from the repository root with corept installed on PYTHONPATH (docs/planning.md has the exact
H200 commands). Parts (``--parts``; each within one ~9-minute call with the defaults):

* ``measure``: Llama-3.1-8B and Qwen3-8B configs with random bf16 weights, 16-bit LoRA and QLoRA
  (r 16, torch AdamW, corept checkpointing), seq 1024 / 4096 / 16384, batch 1, 3 training steps;
  ``torch.cuda.max_memory_allocated`` vs the planner's ``peak_allocated`` (goal: within 10%).
* ``emulate``: ``set_per_process_memory_fraction(cap / total)``, cap = the RTX 3090's 23.70 GiB
  minus the 0.5 GiB CUDA context a real card holds (``--emulate-gib``): every grid config the
  planner says fits in 24 GB, and its recommended (seq, batch, r), must train 5 steps.
* ``search``: QLoRA r 32 Llama-3.1-8B, batch 1, under the same cap: the longest sequence that
  trains (bisection) vs the planner's longest (goal: within 15%).

One subprocess per (arch, method, rank) loads the model once and runs its configs in order;
``max_memory_allocated`` is reset before each config. QLoRA bases are saved once to ``--ckpt-dir``
and loaded with ``corept.load(load_in_4bit=True)``. One line is printed per record; results go to
``<out>/plan-<date>-<tag>-<parts>.json`` and ``.md``; ``--merge`` combines several such files
(the reports: ``bench/plan_report.py``).
"""
from __future__ import annotations

import argparse, datetime, gc, json, math, os, platform, shutil, subprocess, sys, tempfile, time  # noqa: E401

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/ holds kernels.py, which transformers would mistake for HF's `kernels`
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("PYTHONUNBUFFERED", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

GIB = 2**30


def _bench(name: str):
    """A bench/ module by file path (bench/ is not on ``sys.path``), registered in ``sys.modules``
    (dataclasses look their module up there)."""
    import importlib.util

    key = f"corept_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                        f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _report():
    """bench/plan_report.py: environment, tables, result files, merging."""
    return _bench("plan_report")


def _commit() -> str | None:
    return _bench("common").source_commit()


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512)
# `--archs` names -> the model configs the plugins declare (corept.planning.known): the validation grid's two
# 8B architectures, and the other size classes of the seed's RTX 3090 table (`--archs llama1b,qwen14b`)
KNOWN = {"llama": "meta-llama/Llama-3.1-8B", "qwen3": "Qwen/Qwen3-8B", "llama1b": "meta-llama/Llama-3.2-1B",
         "llama3b": "meta-llama/Llama-3.2-3B", "qwen14b": "Qwen/Qwen2.5-14B", "qwen32b": "Qwen/Qwen2.5-32B"}
NAMES = {k: v.split("/")[1] for k, v in KNOWN.items()}
EMULATED_GPU = _report().EMULATED_GPU


def model_config(arch: str, tiny: bool) -> dict:
    from corept.planning.known import known_configs

    d = dict(known_configs()[KNOWN[arch]])
    if tiny:
        d.update(TINY, max_position_embeddings=4096)
        if "rope_scaling" in d:
            d["rope_scaling"] = dict(d["rope_scaling"], original_max_position_embeddings=1024)
    return d


# ----------------------------------------------------------------------------------- the worker
def _hf_config(d: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})


def _ensure_checkpoint(spec: dict, dev: str) -> str:
    """A saved bf16 checkpoint of the config (random weights), made once per arch."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = os.path.join(spec["ckpt_dir"], spec["arch"] + ("-tiny" if spec["tiny"] else ""))
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    os.makedirs(spec["ckpt_dir"], exist_ok=True)
    for other in os.listdir(spec["ckpt_dir"]):  # make room: one 16 GB checkpoint at a time
        if other != os.path.basename(folder) and shutil.disk_usage(spec["ckpt_dir"]).free < 40 * GIB:
            shutil.rmtree(os.path.join(spec["ckpt_dir"], other), ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    t = time.time()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(_hf_config(spec["config"]), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    open(os.path.join(folder, ".complete"), "w").close()
    print(f"[worker] saved random bf16 checkpoint {folder} in {time.time() - t:.0f}s", flush=True)
    return folder


def _build(spec: dict, dev: str):
    """corept-patched model with corept LoRA (fused kernels, corept checkpointing)."""
    import torch
    from transformers import AutoModelForCausalLM

    import corept

    max_seq = max([r.get("seq", 0) for r in spec["runs"]] + [spec.get("search", {}).get("cap", 0)])
    if spec["method"] == "qlora":
        folder = _ensure_checkpoint(spec, dev)
        model, _ = corept.load(folder, load_in_4bit=True, dtype="bf16", max_seq_length=max(max_seq, 1))
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(_hf_config(spec["config"]), dtype=torch.bfloat16)
        corept.patch(model)
    model = corept.get_peft_model(model, r=spec["r"], lora_alpha=spec["r"], use_gradient_checkpointing="corept")
    model.train()
    return model


def _step(model, opt, seq: int, batch: int, vocab: int, dev: str, gen) -> float:
    import torch

    ids = torch.randint(0, vocab, (batch, seq), device=dev, generator=gen)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _config(spec: dict, run: dict) -> dict:
    return {"arch": spec["arch"], "model": NAMES[spec["arch"]], "method": spec["method"], "seq": run["seq"],
            "batch": run["batch"], "r": spec["r"], "optim": "adamw", "checkpointing": "corept"}


def _run_one(model, opt, run: dict, spec: dict, dev: str, gen) -> dict:
    """Train ``run["steps"]`` steps at (seq, batch) under the run's memory cap; measure the peak."""
    import torch

    cuda = torch.cuda if dev == "cuda" else None
    rec = {"kind": run["kind"], "config": _config(spec, run), "steps": run["steps"], "emulated": bool(run.get("emulated")),
           **{k: v for k, v in run.items() if k.startswith(("predicted", "planner"))}}
    if cuda:
        cap = run.get("cap_bytes")
        cuda.set_per_process_memory_fraction(cap / cuda.get_device_properties(0).total_memory if cap else 1.0)
        gc.collect()
        cuda.empty_cache()
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    t, losses = time.time(), []
    try:
        for _ in range(run["steps"]):
            losses.append(_step(model, opt, run["seq"], run["batch"], spec["config"]["vocab_size"], dev, gen))
        if cuda:
            cuda.synchronize()
        rec.update(ok=True, loss=losses[-1], loss_finite=all(math.isfinite(x) for x in losses))
    except torch.OutOfMemoryError as exc:
        rec.update(ok=False, error="OOM: " + str(exc).split("\n")[0][:200])
    except Exception as exc:  # noqa: BLE001 - recorded, the next config still runs
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    rec["step_s"] = round((time.time() - t) / max(1, len(losses) or 1), 3)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        rec["measured_gib"] = round(cuda.max_memory_allocated() / GIB, 3)
        rec["reserved_gib"] = round(cuda.max_memory_reserved() / GIB, 3)
        cuda.empty_cache()
        cuda.set_per_process_memory_fraction(1.0)
    else:
        rec["measured_gib"] = None
    if rec.get("ok") and rec.get("measured_gib") and rec.get("predicted_gib"):
        rec["error_pct"] = round(100 * (rec["predicted_gib"] - rec["measured_gib"]) / rec["measured_gib"], 2)
    return rec


def _search(model, opt, spec: dict, dev: str, gen, emit, deadline: float) -> None:
    """Bisect the longest seq (multiple of 256) that trains one steady-state step under the cap."""
    s = spec["search"]
    step, lo, hi, t_last, seq_last = 256, None, None, None, None
    seq = s["planner_seq"]
    for _ in range(s["max_probes"]):
        if t_last and time.time() + t_last * (seq / seq_last) ** 1.5 + 20 > deadline:
            break
        run = dict(kind="search-probe", seq=seq, batch=1, steps=s["probe_steps"], cap_bytes=s["cap_bytes"],
                   predicted_gib=s["predictions"].get(str(seq)))
        rec = _run_one(model, opt, run, spec, dev, gen)
        emit(rec)
        t_last, seq_last = rec["step_s"] * run["steps"], seq
        if rec["ok"]:
            lo = seq if lo is None else max(lo, seq)
        elif rec.get("error", "").startswith("OOM"):
            hi = seq if hi is None else min(hi, seq)
        else:
            break
        if hi is None:
            nxt = max(s["raw_seq"], int(lo * 1.08)) if seq < s["raw_seq"] else int(lo * 1.08)
        elif lo is None:
            nxt = int(hi * 0.75)
        else:
            nxt = (lo + hi) // 2
        nxt = min(s["cap"], nxt // step * step)
        if nxt in (lo, hi) or (lo and hi and (hi - lo) <= max(step, 0.03 * lo)) or (lo and nxt <= lo and hi is None):
            break
        seq = nxt
    within = lo is not None and abs(s["planner_seq"] - lo) <= 0.15 * lo
    emit({"kind": "search", "config": {"arch": spec["arch"], "model": NAMES[spec["arch"]], "method": spec["method"],
                                       "batch": 1, "r": spec["r"]},
          "gpu_emulated": EMULATED_GPU, "planner_seq": s["planner_seq"], "planner_raw_seq": s["raw_seq"],
          "measured_max_seq": lo, "first_oom_seq": hi, "ratio": round(s["planner_seq"] / lo, 3) if lo else None,
          "within_15pct": within, "planner_fits_and_trains": bool(lo and lo >= s["planner_seq"])})


def worker(spec: dict) -> int:
    from corept.training.cuda_memory import prefer_expandable_segments

    prefer_expandable_segments()  # as `corept train` runs (the planner assumes it); before CUDA starts
    import torch

    dev, out = spec["device"], spec["jsonl"]
    deadline, commit = spec["deadline"], _commit()

    def emit(rec: dict) -> None:
        rec.update(gpu=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", worker_s=round(time.time() - t0, 1),
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), commit=commit)
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        c, keys = rec.get("config", {}), ("ok", "measured_gib", "predicted_gib", "error_pct", "error", "planner_seq",
                                          "measured_max_seq", "first_oom_seq")
        print(f"[{rec['kind']}] {c.get('model')} {c.get('method')} r{c.get('r')} seq {c.get('seq', '-')} bs "
              f"{c.get('batch')}: " + " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k) is not None), flush=True)

    t0 = time.time()
    torch.manual_seed(0)
    try:
        model = _build(spec, dev)
    except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes missing: say so in every record
        for run in spec["runs"]:
            emit({"kind": run["kind"], "config": _config(spec, run), "ok": False,
                  "error": f"build failed: {type(exc).__name__}: {str(exc)[:300]}"})
        raise
    cuda = torch.cuda if dev == "cuda" else None
    setup = cuda.memory_allocated() / GIB if cuda else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)  # foreach, as HF's adamw_torch (the planner's "adamw")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"[worker] {spec['arch']} {spec['method']} r{spec['r']}: built in {time.time() - t0:.0f}s, allocated "
          f"{setup and round(setup, 2)} GiB (predicted static {spec.get('predicted_static_gib')})", flush=True)
    for run in spec["runs"]:
        if time.time() > deadline:
            emit({"kind": run["kind"], "config": _config(spec, run), "ok": None, "error": "skipped: out of time"})
            continue
        rec = _run_one(model, opt, run, spec, dev, gen)
        rec.update(setup_gib=None if setup is None else round(setup, 3),
                   predicted_static_gib=spec.get("predicted_static_gib"))
        if run["kind"] == "measure" and run.get("emulated") and not rec["ok"]:
            rec["kind"] = "emulate"  # failed under the 24 GB cap: keep that verdict, measure uncapped
            emit(rec)
            rec = _run_one(model, opt, dict(run, emulated=False, cap_bytes=None, steps=spec.get("steps", 3)),
                           spec, dev, gen)
        emit(rec)
    if spec.get("search"):
        warm = dict(kind="search-warmup", seq=512, batch=1, steps=1, cap_bytes=spec["search"]["cap_bytes"])
        _run_one(model, opt, warm, spec, dev, gen)  # creates the AdamW states: probes are steady state
        _search(model, opt, spec, dev, gen, emit, deadline)
    return 0


# ----------------------------------------------------------------------------------- the parent
def _predict(arch: str, tiny: bool, method: str, seq: int, batch: int, r: int, gpu: str):
    from corept.planning import estimate, model_shape

    shape = model_shape(model_config(arch, tiny))
    return estimate(shape, method=method, seq=seq, batch=batch, r=r, gpu=gpu)


def _specs(args) -> list[dict]:
    """Worker specs, one per (arch, method, rank). A grid config the planner says fits in 24 GB is
    measured *under* the 24 GB cap (one run answers both questions; on OOM the worker re-measures
    it uncapped); the others are measured uncapped."""
    from corept.planning import plan
    from corept.planning.gpus import GPUS, GpuProfile
    from corept.planning.recommend import longest_seq
    from corept.planning.shape import model_shape

    emu = GPUS[EMULATED_GPU]
    # A real card holds its CUDA context inside its memory; the emulated allocator gets the rest.
    cap_gib = args.emulate_gib or (emu.usable_gib - emu.context_gib)
    cap = int(cap_gib * GIB) if args.device == "cuda" else None  # the worker makes it a memory fraction
    groups: dict = {}

    def group(arch, method, r):
        if (arch, method, r) not in groups:
            est = _predict(arch, args.tiny, method, 1024, 1, r, "h200")
            groups[arch, method, r] = dict(
                arch=arch, method=method, r=r, tiny=args.tiny, config=model_config(arch, args.tiny),
                ckpt_dir=args.ckpt_dir, device=args.device, runs=[], steps=args.steps,
                predicted_static_gib=round((est.components["weights"] + est.components["trainable_params"]) / GIB, 3))
        return groups[arch, method, r]

    def run(kind, est, emulated, steps):
        return dict(kind=kind, seq=est.seq, batch=est.batch, steps=steps, emulated=emulated,
                    cap_bytes=cap if emulated else None, predicted_gib=round(est.peak_allocated / GIB, 3),
                    predicted_phase=est.peak_phase, planner_required_gib=round(est.required / GIB, 3),
                    predicted_components_gib={k: round(v / GIB, 3) for k, v in est.components.items()})

    for arch in args.archs:
        for method in args.methods:
            for seq in args.seqs:
                est = _predict(arch, args.tiny, method, seq, 1, 16, EMULATED_GPU)
                emulated = "emulate" in args.parts and est.fits
                if "measure" in args.parts or emulated:
                    steps = max(args.steps, args.emulate_steps) if emulated else args.steps
                    group(arch, method, 16)["runs"].append(run("measure" if "measure" in args.parts else "emulate",
                                                               est, emulated, steps))
            if "emulate" in args.parts:
                rec = plan(model_config(arch, args.tiny), method, gpu=EMULATED_GPU).recommendation
                seq, batch = rec["max_seq_length"], rec["batch_size"]
                if args.tiny:  # dry run: same code path, CPU-sized
                    seq, batch = min(seq, 256), min(batch, 2)
                est = _predict(arch, args.tiny, method, seq, batch, rec["r"], EMULATED_GPU)
                group(arch, method, rec["r"])["runs"].append(run("emulate-recommended", est, True, args.emulate_steps))
    if "search" in args.parts:
        shape = model_shape(model_config("llama", args.tiny))
        seq_cap = min(shape.max_positions or 131072, args.search_cap)
        planner_seq = min(plan(shape, "qlora", gpu=EMULATED_GPU, r=32, batch_size=1).longest_seq_at_batch_1, seq_cap)
        raw_gpu = GpuProfile("rtx3090-raw", "allocator cap only", cap_gib, context_gib=0.0)
        raw = longest_seq(shape, raw_gpu, 0.0, batch=1, method="qlora", r=32, optim="adamw", checkpointing="corept",
                          slack=0.0)
        preds = {str(s): round(_predict("llama", args.tiny, "qlora", s, 1, 32, EMULATED_GPU).peak_allocated / GIB, 3)
                 for s in range(256, seq_cap + 1, 256)}
        group("llama", "qlora", 32)["search"] = dict(
            planner_seq=planner_seq, raw_seq=min(raw, seq_cap), cap=seq_cap, cap_bytes=cap,
            probe_steps=args.probe_steps, max_probes=args.max_probes, predictions=preds)
    return list(groups.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the results (JSON + markdown)")
    for flag, default, help_ in (
            ("--parts", "measure,emulate,search", "comma-separated parts"), ("--archs", "llama,qwen3", None),
            ("--methods", "lora,qlora", None), ("--seqs", "1024,4096,16384", None), ("--steps", 3, "steps per measure"),
            ("--emulate-steps", 5, None), ("--probe-steps", 1, "steady-state steps per search probe"),
            ("--max-probes", 7, None), ("--search-cap", 131072, None),
            ("--ckpt-dir", "/tmp/corept-plan-ckpt", "where QLoRA bases are saved once"),
            ("--budget-s", 540.0, "wall-clock budget of this call"),
            ("--emulate-gib", 0.0, "allocator cap of the emulated card (default: rtx3090 usable - context)")):
        ap.add_argument(flag, type=type(default), default=default, help=help_)
    ap.add_argument("--keep-ckpt", action="store_true")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry run of the code paths")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (with --device cpu: a quick dry run)")
    ap.add_argument("--tag", default=None, help="file-name tag (default h200 on an H200, else the device)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine result files and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(open(args.worker).read()))
    if args.merge:
        print(_report().merge(args.merge, args.out, args.tag or "h200"))
        return 0
    t0 = time.time()
    deadline = t0 + args.budget_s
    args.parts = [p for p in args.parts.split(",") if p]
    args.archs = args.archs.split(",")
    args.methods = args.methods.split(",")
    args.seqs = [] if args.seqs == "none" else [int(s) for s in args.seqs.split(",")]  # none: recommendations only
    specs = _specs(args)
    os.makedirs(args.out, exist_ok=True)
    jsonl, work = os.path.join(args.out, f"records-{int(t0)}.jsonl"), tempfile.mkdtemp(prefix="plan-validate-")
    for spec in specs:
        left = deadline - time.time()
        if left < 30:
            print(f"[parent] out of time: skipping {spec['arch']} {spec['method']} r{spec['r']}", flush=True)
            continue
        spec.update(jsonl=jsonl, deadline=deadline - 15)
        spec_path = os.path.join(work, f"spec-{spec['arch']}-{spec['method']}-r{spec['r']}.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--out", args.out, "--worker", spec_path]
        try:
            rc = subprocess.run(cmd, timeout=left + 10).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"[parent] worker {spec['arch']} {spec['method']} r{spec['r']} exited {rc} "
              f"({time.time() - t0:.0f}s elapsed)", flush=True)
    if not args.keep_ckpt:
        shutil.rmtree(args.ckpt_dir, ignore_errors=True)
    records = [json.loads(line) for line in open(jsonl)] if os.path.exists(jsonl) else []
    env = _report().environment(records, _commit())
    tag = args.tag or ("h200" if "H200" in str(env.get("gpu")) else str(env.get("gpu") or args.device).split()[-1].lower())
    stem = f"plan-{env['date']}-{tag}-{'-'.join(args.parts)}" + ("-tiny" if args.tiny else "")
    path = _report().write(records, env, args.out, stem)
    print(_report().markdown(records, env))
    print(f"[parent] wrote {path} ({len(records)} records, {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
