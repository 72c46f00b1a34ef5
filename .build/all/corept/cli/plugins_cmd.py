"""``corept plugins``: the installed plugins, what they declare and whether they loaded."""
from __future__ import annotations

import json

from corept.plugins import BUILTIN_FALLBACKS, get_plugin_manager

HELP = "list installed corept plugins"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def collect() -> list[dict]:
    pm = get_plugin_manager()
    return [rec.to_dict() for rec in pm.records.values() if rec.name != BUILTIN_FALLBACKS]


def run(args) -> int:
    rows = collect()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no corept plugins installed (pip install corept-llama, ...)")
    for r in rows:
        status = "loaded" if r["loaded"] else f"NOT LOADED: {r['error']}"
        print(f"{r['name']} {r['version'] or ''} ({r['distribution']}) - {status}")
        print(f"  model_types: {', '.join(r['model_types']) or '-'}")
        print(f"  hooks: {', '.join(r['hooks']) or '-'}")
        print(f"  transformers: {r['transformers']}")
    return 0
