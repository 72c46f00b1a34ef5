"""generate() speed of a corept LoRA model, mode by mode: where sampling time goes (issue 23).

    PYTHONPATH=/tmp/site_corept:/tmp/site_base python3 -P bench/generation_speed.py \
        --folder /tmp/corept-e2e-ckpt/llama-3.1-8b --out $OUT      # after bench/run_e2e_h200.sh prepared it
    PYTHONPATH=.build/all .venv/bin/python -P bench/generation_speed.py --folder HuggingFaceTB/SmolLM2-135M-Instruct \
        --rows 2 --prompt 16 --new 24 --repeats 3 --threads 1 --out bench/results   # host overhead, on CPU

TRL's GRPOTrainer samples with the policy in **training mode** under ``no_grad`` (it never calls
``eval()``), so a patched model decodes through whatever its forwards do in training. One model,
``corept.load`` + ``corept.get_peft_model`` (r 16, the 7 projections) as the README shows, then
greedy ``generate()`` (KV cache, ``--rows`` x ``--new`` tokens after a ``--prompt``-token prompt,
EOS masked) in each mode, in this order:

* ``patched-eval``: ``model.eval()``;
* ``patched-train``: ``model.train()`` (TRL's way), corept's checkpointing as installed;
* ``patched-train-nockpt``: training mode with each layer's ``gradient_checkpointing`` flag off;
* ``unpatched-eval`` / ``unpatched-train-nockpt``: after ``corept.unpatch(model)``.

Each mode: one warm-up call of 8 new tokens, then ``--repeats`` timed calls (the fastest counts);
tok/s = rows x new / seconds. On CPU (no CUDA) the kernels' torch twins run: what is measured there
is corept's host work per decode step, which is what a GPU decode step is bound by.
``--profile`` adds a ``torch.profiler`` table (top ops by self CPU time) of 8 decode steps in
``patched-train`` and ``unpatched-train-nockpt``. Results: ``genspeed-<date>-<gpu>.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate(model, ids, new: int) -> float:
    _sync()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, use_cache=True, pad_token_id=0)
    _sync()
    return time.perf_counter() - t


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func")]


def _mode(model, name: str):
    train = "train" in name
    model.train(train)
    for m in _layers(model):
        m.__dict__["gradient_checkpointing"] = not name.endswith("nockpt") and getattr(m, "_corept_ckpt_flag", True)


def _profile(model, ids) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _generate(model, ids, 8)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--checkpointing", default="auto")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import corept
    import transformers

    cuda = torch.cuda.is_available()
    model, _ = corept.load(args.folder, max_seq_length=args.prompt + args.new + 8,
                           dtype=torch.bfloat16 if cuda else torch.float32)
    model = corept.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=args.checkpointing)
    for m in _layers(model):
        m._corept_ckpt_flag = bool(m.gradient_checkpointing)
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    rows, tables = [], {}
    modes = ["patched-eval", "patched-train", "patched-train-nockpt", "unpatched-eval", "unpatched-train-nockpt"]
    for name in modes:
        if name.startswith("unpatched") and corept.report(model).applied:
            corept.unpatch(model)
        _mode(model, name)
        _generate(model, ids, 8)
        seconds = min(_generate(model, ids, args.new) for _ in range(args.repeats))
        rows.append(dict(mode=name, seconds=round(seconds, 3), tok_s=round(args.rows * args.new / seconds, 1),
                         ms_per_step=round(1000 * seconds / args.new, 2)))
        print(rows[-1], flush=True)
        if args.profile and name in ("patched-train", "unpatched-train-nockpt"):
            tables[name] = _profile(model, ids)
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU cpu"
    record = dict(gpu=gpu, date=dt.date.today().isoformat(), torch=torch.__version__,
                  transformers=transformers.__version__, rows=rows, args=vars(args), profiles=tables)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"genspeed-{record['date']}-{gpu.split()[1].lower() if len(gpu.split()) > 1 else 'gpu'}"
    (out / f"{tag}.json").write_text(json.dumps(record, indent=2))
    lines = [f"generate() speed, {args.folder.rstrip('/').rsplit('/', 1)[-1]}, LoRA r16 (checkpointing "
             f"{args.checkpointing}), {args.rows} rows x {args.new} new tokens after {args.prompt}, greedy, KV cache; "
             f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, {record['date']}.", "",
             "| mode | seconds | tok/s | ms per decode step |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['seconds']} | {r['tok_s']} | {r['ms_per_step']} |" for r in rows]
    for name, table in tables.items():
        lines += ["", f"### {name}: top ops by self CPU time (8 new tokens)", "", "```", table, "```"]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
