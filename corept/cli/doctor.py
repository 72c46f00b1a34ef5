"""``corept doctor``: versions, GPU and Triton mode, plugin problems."""
from __future__ import annotations

import json

from corept.versions import (SUPPORTED_TORCH, SUPPORTED_TRANSFORMERS, SUPPORTED_TRITON, in_range, installed_version,
                             transformers_supported)

HELP = "check the environment: library versions, GPU, bf16, Triton interpreter, plugin problems"
PACKAGES = {"torch": SUPPORTED_TORCH, "triton": SUPPORTED_TRITON, "transformers": SUPPORTED_TRANSFORMERS,
            "peft": None, "trl": None, "bitsandbytes": None, "accelerate": None, "datasets": None,
            "corept": None, "corept-kernels": None}


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def collect() -> dict:
    import torch
    from corept_kernels import interpreter_active

    from corept.registry.manager import get_plugin_manager

    problems = []
    versions = {}
    for dist, spec in PACKAGES.items():
        v = installed_version(dist)
        versions[dist] = v
        if spec is not None:
            ok, reason = in_range(v, spec)
            if not ok:
                problems.append(f"{dist}: {reason}; corept falls back where it must")
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
               "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    pm = get_plugin_manager()
    for rec in pm.records.values():
        if rec.error and not rec.error.startswith(("not listed", "disabled", "plugin name conflict")):
            problems.append(f"plugin {rec.name} ({rec.distribution}): {rec.error}")
    problems += pm.problems
    for arch, rec in pm.declarations():
        ok, reason = transformers_supported(arch.transformers)
        if not ok:
            problems.append(f"plugin {rec.name} ({rec.distribution}) declares transformers {arch.transformers!r} for "
                            f"{arch.model_type!r}: {reason}; its models load unpatched")
    for mt in pm.model_types():
        try:
            pm.architecture_for(mt)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problems.append(str(exc))
    plugins = [{"name": rec.name, "distribution": rec.distribution, "version": rec.version, "loaded": rec.loaded,
                "model_types": [a.model_type for a in rec.architectures]}
               for rec in sorted(pm.records.values(), key=lambda r: r.name) if not rec.builtin]
    return {"versions": versions, "gpu": gpu, "plugins": plugins, "triton_interpreter": interpreter_active(),
            "triton_mode": "gpu" if gpu else ("interpreter" if interpreter_active() else "torch fallbacks (no GPU, TRITON_INTERPRET unset)"),
            "problems": problems}


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info["versions"].items():
        print(f"{k:16s} {v or 'not installed'}")
    g = info["gpu"]
    print(f"{'gpu':16s} {g['name'] + ', bf16 ' + ('yes' if g['bf16'] else 'no') if g else 'none'}")
    mode = {"gpu": "Triton on the GPU", "interpreter": "Triton interpreter (TRITON_INTERPRET=1)"}
    print(f"{'kernels run as':16s} {mode.get(info['triton_mode'], info['triton_mode'])}")
    print(f"{'plugins':16s} " + (", ".join(f"{p['name']} ({', '.join(p['model_types'])})" + ("" if p["loaded"]
                                                                                           else " NOT LOADED")
                                            for p in info["plugins"]) or "none installed"))
    print("problems:" if info["problems"] else "no problems found")
    for p in info["problems"]:
        print(f"  - {p}")
    return 0
