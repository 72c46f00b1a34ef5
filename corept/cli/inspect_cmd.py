"""``corept inspect NAME_OR_PATH``: plugin, quirks and planned patches, from the config alone."""
from __future__ import annotations

import json

from corept.registry.declarations import COMPONENTS
from corept.registry.declarations import COMPONENT_ROLES

HELP = "show which plugin and patches a model would get (reads the config only, no weights)"


def add_arguments(p) -> None:
    p.add_argument("model", help="local folder or config.json, plugin alias (corept plugins lists them), a model a "
                                 "plugin declares (answered offline from its built-in config), HF cache or hub id "
                                 "(config.json only)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--trust-remote-code", action="store_true")


def collect(name: str, trust_remote_code: bool = False) -> dict:
    from pathlib import Path

    from corept.planning.shape import load_config
    from corept.registry.resolution import resolve

    config, resolved, source = load_config(name, trust_remote_code=trust_remote_code)
    how, _, where = source.partition(": ")  # "local folder: /path/config.json", "built-in copy of ...'s config"
    if where:
        resolved = str(Path(where).parent if where.endswith("config.json") else Path(where))
    arch = resolve(config)
    info = {"model": name, "resolved": resolved, "found_via": how, "model_type": config.model_type,
            "plugin": None, "distribution": None, "quirks": {}, "components": {}, "notes": "", "gguf": None}
    if arch is None:
        info["components"] = {c: "transformers (no plugin)" for c in COMPONENTS if c != "experts"}
        return info
    gguf = arch.declaration.gguf
    info.update(plugin=arch.plugin, distribution=arch.distribution, notes=arch.notes, quirks=arch.quirks(),
                transformers_range=arch.declaration.transformers, gguf=gguf.arch if gguf else None)
    for comp in COMPONENTS:
        classes = getattr(arch.roles, COMPONENT_ROLES[comp])
        if comp == "experts" and not classes and comp not in arch.keep:
            continue  # a dense model: no experts to speak of
        if not arch.supported:
            info["components"][comp] = f"transformers ({arch.unsupported_reason})"
        elif comp in arch.keep:
            info["components"][comp] = f"transformers (plugin keeps it: {arch.keep[comp]})"
        elif not classes:
            info["components"][comp] = "transformers (no module of this role declared)"
        elif comp == "attention":
            impl = arch.load.forced_attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
            info["components"][comp] = f"transformers AttentionInterface: {impl}"
        else:
            info["components"][comp] = f"corept on {', '.join(classes)}, once its probe passes"
    return info


def run(args) -> int:
    info = collect(args.model, args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"model:      {info['model']}  ({info['found_via']})")
    print(f"model_type: {info['model_type']}")
    print(f"plugin:     {info['plugin'] or 'none - the model would load unpatched'}")
    if info["notes"]:
        print(f"notes:      {info['notes']}")
    print("components:")
    for comp, what in info["components"].items():
        print(f"  {comp:10s} {what}")
    if info["plugin"]:
        print(f"gguf:       {info['gguf'] + ' (llama.cpp architecture)' if info['gguf'] else 'no export declared'}")
    if info["quirks"]:
        print("quirks:")
        for k, v in info["quirks"].items():
            print(f"  {k:20s} {v}")
    return 0
