"""``corept support-matrix``: the architecture x component x quirks table from the plugins' declarations."""
from __future__ import annotations

HELP = "print (or write into README.md) the support matrix generated from the installed plugins"


def add_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="README", help="replace the marked block in this file")
    g.add_argument("--check", metavar="README", help="exit 1 if the marked block in this file is stale")


def run(args) -> int:
    from corept.registry import support_matrix as sm

    if args.write:
        changed = sm.write(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
        return 0
    if args.check:
        if sm.current_block(args.check) != sm.block():
            print(f"{args.check}: the support matrix is stale; run `corept support-matrix --write {args.check}`")
            return 1
        print(f"{args.check}: the support matrix is up to date")
        return 0
    print(sm.render())
    return 0
