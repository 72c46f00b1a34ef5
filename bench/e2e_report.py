"""Results files of the end-to-end benchmark: ``e2e-<date>-<tag>.json`` and a markdown table beside it.

Standard library only. The JSON is a list of records (throughput records with ``kind:
"throughput"``, longest-sequence searches with ``kind: "maxseq"``, the checkpoint preparation with
``kind: "prepare"``); :func:`merge` combines the files of several calls (split runs) into one.
"""
from __future__ import annotations

import datetime
import json
import os

_KEY = ("kind", "variant", "model", "shape")
_ORDER = ("hf", "hf_bf16", "liger", "unsloth", "corept", "corept_prev", "hf_qlora", "unsloth_qlora", "corept_qlora",
          "corept_qlora_prev")


def _row_key(r: dict) -> tuple:
    b, _, s = str(r.get("shape") or "0x0").partition("x")
    v = r.get("variant")
    return (str(r.get("model")), int(s or 0), int(b or 0), _ORDER.index(v) if v in _ORDER else len(_ORDER), str(v))


def paths(out_dir: str, tag: str, date: str | None = None, prefix: str = "e2e") -> tuple[str, str]:
    date = date or datetime.date.today().isoformat()
    stem = os.path.join(out_dir, f"{prefix}-{date}-{tag}")
    return stem + ".json", stem + ".md"


def write(records: list[dict], out_dir: str, tag: str, date: str | None = None, *, prefix: str = "e2e",
          render=None) -> tuple[str, str]:
    """Write both files atomically (called after every record, so a killed call keeps its results).

    ``prefix`` and ``render`` (records -> markdown; default :func:`markdown`) serve the other
    benchmarks that reuse this format (bench/packing.py).
    """
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = paths(out_dir, tag, date, prefix)
    for path, text in ((jpath, json.dumps(records, indent=1, default=str)), (mpath, (render or markdown)(records))):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(path + ".tmp", path)
    return jpath, mpath


def merge(files: list[str]) -> list[dict]:
    """Records of ``files`` in order; a later record with the same kind/variant/model/shape wins,
    except that a failed or skipped one never replaces a successful one."""
    seen: dict[tuple, dict] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for r in json.load(fh):
                key = tuple(r.get(k) for k in _KEY)
                if key in seen and "error" in r and "error" not in seen[key]:
                    continue
                seen[key] = r
    return list(seen.values())


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


def _tps(r: dict):
    """Tokens per second by the median timed step (older records: by the mean)."""
    return r.get("median_tokens_per_s", r.get("tokens_per_s"))


def throughput_table(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r.get("kind", "throughput") == "throughput"), key=_row_key)
    if not rows:
        return []
    ref = {(r["variant"], r["model"], r["shape"]): r for r in rows if "error" not in r}
    lines = ["| variant | model | shape | tok/s (median step) | × hf | × unsloth | median step s | spread max/min "
             "| warm-up s | graphs | peak GiB | after load GiB | activation GiB | loss | Δloss vs hf | first loss "
             "| error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, s, v = r.get("model"), r.get("shape"), r.get("variant")
        quant = "_qlora" in v if v else False
        hf = ref.get(("hf_qlora" if quant else "hf", m, s), {})
        un = ref.get(("unsloth_qlora" if quant else "unsloth", m, s), {})
        tps = _tps(r) if "error" not in r else None
        dloss = (r["loss"] - hf["loss"]) if "error" not in r and r.get("loss") is not None and hf.get("loss") is not None else None
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:80]
        graphs = (r.get("dynamo") or {}).get("stats", {}).get("unique_graphs")
        lines.append(f"| {v} | {m} | {s} | {_f(tps, '{:,.0f}')} | {_ratio(tps, _tps(hf))} "
                     f"| {_ratio(tps, _tps(un))} | {_f(r.get('median_step_s'), '{:.3f}')} "
                     f"| {_f(r.get('spread'), '{:.3f}')} | {_f(r.get('warmup_s'), '{:.1f}')} | {_f(graphs, '{}')} "
                     f"| {_f(r.get('peak_gib'))} | {_f(r.get('after_load_gib'))} | {_f(r.get('activation_gib'))} "
                     f"| {_f(r.get('loss'), '{:.4f}')} | {_f(dloss, '{:+.4f}')} | {_f(r.get('loss0'), '{:.4f}')} | {err} |")
    return lines


def maxseq_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("kind") == "maxseq"]
    if not rows:
        return []
    lines = ["", "| variant | model | cap GiB | LoRA r | longest seq | step s there | peak GiB there | first fail "
             "| complete | probes (seq:ok) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probes = " ".join(f"{p['seq']}:{'y' if p['ok'] else 'n'}" for p in r.get("probes", []))
        lines.append(f"| {r['variant']} | {r['model']} | {r.get('cap_gib')} | {r.get('rank')} "
                     f"| {_f(r.get('max_seq'), '{:,}')} | {_f(r.get('step_s'))} | {_f(r.get('peak_gib'))} "
                     f"| {_f(r.get('first_fail'), '{:,}')} | {r.get('complete')} | {probes} |")
    return lines


def profile_table(records: list[dict]) -> list[str]:
    """One row per profiled throughput record: busy vs wall time, the four largest categories and
    the largest kernel (``bench/e2e_profile.py``)."""
    rows = [r for r in records if r.get("kind") == "throughput" and r.get("profile")]
    if not rows:
        return []
    lines = ["", "Profiled step (one extra step after the timed ones, torch.profiler; ms):", "",
             "| variant | model | shape | busy / wall ms | largest categories | largest kernel |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["profile"]
        cats = ", ".join(f"{k} {v:.1f}" for k, v in list(p["by_category_ms"].items())[:4])
        big = p["top"][0] if p["top"] else {"name": "-", "ms": 0.0}
        lines.append(f"| {r['variant']} | {r['model']} | {r['shape']} | {p['busy_ms']:.1f} / {p['wall_ms']:.1f} "
                     f"| {cats} | {big['name'][:60]} {big['ms']:.1f} |")
    return lines


def package_versions(records: list[dict], keys) -> dict:
    """``{package: version}`` for ``keys``: each stack's records carry its own package set (unsloth's
    only in unsloth's runs), so the first record that has a version of a package names it."""
    return {k: next((r["versions"][k] for r in records if (r.get("versions") or {}).get(k)), None) for k in keys}


def markdown(records: list[dict]) -> str:
    """Header (GPU, versions, method), the throughput table and the longest-sequence table."""
    env = next((r for r in records if r.get("versions")), {})
    keys = ("torch", "triton", "transformers", "peft", "liger_kernel", "unsloth", "bitsandbytes")
    ver = package_versions(records, keys)
    steps = next((r for r in records if r.get("kind") == "throughput" and "warmup" in r), {})
    head = [f"End-to-end LoRA fine-tuning on {env.get('gpu') or 'CPU'} — {env.get('date', '')}; "
            + ", ".join(f"{k} {ver[k]}" for k in keys if ver[k] is not None) + ".",
            "Each run in its own process"
            + (f"; {steps['warmup']} warm-up + {steps['steps']} timed steps; tok/s over the timed steps" if steps else "")
            + "; peak = max allocated; activation = peak − after load (bench/e2e.py, "
            "docs/benchmarks-e2e-method.md). × hf / × unsloth: against the 16-bit or QLoRA peer of the same "
            "model and shape. Versions per record in the JSON (unsloth runs carry their own package set).", ""]
    return "\n".join(head + throughput_table(records) + maxseq_table(records) + profile_table(records))
