"""``corept plugins``: the installed plugins (sorted by name), what they declare and whether they loaded.

Aliases are the short names ``corept.load``, ``plan``, ``inspect`` and ``train --model`` accept.
"""
from __future__ import annotations

import json

from corept.registry.manager import get_plugin_manager

HELP = "list installed corept plugins"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="include corept's built-in plugins")


def collect(include_builtin: bool = False) -> list[dict]:
    pm = get_plugin_manager()
    rows = [rec.to_dict() for rec in pm.records.values() if include_builtin or not rec.builtin]
    return sorted(rows, key=lambda r: (not r["builtin"], r["name"]))


def run(args) -> int:
    rows = collect(args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no corept plugins installed (pip install corept-<family>: one per architecture family)")
    for r in rows:
        status = "loaded" if r["loaded"] else f"NOT LOADED: {r['error']}"
        builtin = " (built-in)" if r["builtin"] else ""
        print(f"{r['name']} {r['version'] or ''} ({r['distribution']}){builtin} - {status}")
        print(f"  model_types: {', '.join(r['model_types']) or '-'}")
        if r["aliases"]:
            print(f"  aliases: {', '.join(f'{a} = {t}' for a, t in r['aliases'].items())}")
        if r["models"]:
            print(f"  known models: {', '.join(r['models'])}")
        print(f"  hooks: {', '.join(r['hooks']) or '-'}")
        print(f"  transformers: {r['transformers']}")
    return 0
