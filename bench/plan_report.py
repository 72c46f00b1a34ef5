"""Reports of ``bench/plan_validate.py``: environment, markdown tables, result files, merging.

Loaded by path from plan_validate.py: bench/ is never on ``sys.path`` (its kernels.py would shadow
the ``kernels`` package transformers probes for).
"""
from __future__ import annotations

import datetime, json, os, platform, sys  # noqa: E401

EMULATED_GPU = "rtx3090"


def environment(records: list[dict], commit: str | None = None) -> dict:
    """Date, command, versions, GPU, allocator setting and source commit (the records' own, else ``commit``)."""
    info = {"date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "python": platform.python_version(), "host": platform.node()}
    for mod in ("torch", "triton", "transformers", "peft", "bitsandbytes", "corept", "corept_kernels"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent packages recorded as such
            info[mod] = None
    info["cuda"] = getattr(getattr(sys.modules.get("torch"), "version", None), "cuda", None)
    info["gpu"] = next((r["gpu"] for r in records if r.get("gpu")), None)
    info["cuda_alloc_conf"] = next((r["alloc_conf"] for r in records if r.get("alloc_conf")), None)
    info["commit"] = next((r["commit"] for r in records if r.get("commit")), None) or commit
    return info


def table(head: str, rows: list) -> list[str]:
    return ["| " + " | ".join(head.split(",")) + " |", "|" + "---|" * len(head.split(","))] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def markdown(records: list[dict], env: dict) -> str:
    out = [f"GPU: {env.get('gpu')} · torch {env.get('torch')} · transformers {env.get('transformers')} · "
           f"peft {env.get('peft')} · bitsandbytes {env.get('bitsandbytes')} · {env.get('date')}", ""]
    cfg = lambda r: [r["config"][k] for k in ("model", "method", "seq", "batch", "r")]  # noqa: E731
    ok = lambda r: "yes" if r.get("ok") else f"**no** ({str(r.get('error'))[:60]})"  # noqa: E731
    within = lambda r: "—" if r.get("error_pct") is None else ("yes" if abs(r["error_pct"]) <= 10 else "**no**")  # noqa: E731
    meas = [r for r in records if r["kind"] == "measure"]
    if meas:
        out += table("model,method,seq,batch,r,predicted GiB,measured GiB,error %,reserved GiB,s/step,within ±10%",
                      [cfg(r) + [r.get("predicted_gib"), r.get("measured_gib"), r.get("error_pct", r.get("error")),
                                 r.get("reserved_gib"), r.get("step_s"), within(r)] for r in meas])
    emu = [r for r in records if r.get("emulated")]
    if emu:
        out += [f"24 GB emulation (`set_per_process_memory_fraction`: {EMULATED_GPU} usable memory minus its CUDA "
                "context):", ""]
        out += table("model,method,seq,batch,r,kind,planner required GiB,trained,peak GiB",
                      [cfg(r) + [r["kind"], r.get("planner_required_gib"), ok(r), r.get("measured_gib")] for r in emu])
    probes = [r for r in records if r["kind"] == "search-probe"]
    if probes:
        out += ["Search probes (QLoRA r 32, batch 1, under the 24 GB cap, steady-state step):", ""]
        out += table("seq,predicted GiB,measured GiB,error %,trained", [
            [r["config"]["seq"], r.get("predicted_gib"), r.get("measured_gib"), r.get("error_pct"), ok(r)] for r in probes])
    for r in (r for r in records if r["kind"] == "search"):
        out += table("search (QLoRA r 32; batch 1; 24 GB cap),planner longest seq,measured longest seq,first OOM,"
                      "planner / measured,within 15%", [[r["config"]["model"], r["planner_seq"], r["measured_max_seq"],
                                                          r["first_oom_seq"], r["ratio"],
                                                          "yes" if r["within_15pct"] else "**no**"]])
    return "\n".join(out)


def write(records: list[dict], env: dict, out_dir: str, stem: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    with open(path, "w") as fh:
        json.dump({"environment": env, "gpu": env.get("gpu"), "versions": {k: env.get(k) for k in (
            "torch", "triton", "transformers", "peft", "bitsandbytes", "corept", "cuda", "python")},
            "command": env.get("command"), "records": records}, fh, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as fh:
        fh.write(markdown(records, env) + "\n")
    return path


def merge(paths: list[str], out_dir: str, tag: str) -> str:
    records, env = {}, {}
    for p in paths:  # result files, or a run's records-*.jsonl if it was cut short
        data = json.load(open(p)) if p.endswith(".json") else {"records": [json.loads(x) for x in open(p) if x.strip()]}
        env = env or data.get("environment", {})
        for r in data["records"]:
            key = (r["kind"], r.get("emulated"), json.dumps(r.get("config"), sort_keys=True))
            records[key] = r  # later files win
    stem = f"plan-{datetime.date.today().isoformat()}-{tag}"
    path = write(list(records.values()), env, out_dir, stem)
    print(markdown(list(records.values()), env))
    return path
