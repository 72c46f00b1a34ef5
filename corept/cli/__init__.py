"""The ``corept`` command line: one module per subcommand, registered in :data:`COMMANDS`.

Every error ends in one or two lines on stderr that name the file or option and what to do, and
exit status 2 (130 after Ctrl-C); ``--debug`` (or ``COREPT_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from corept.cli import demo, doctor, export_cmd, inspect_cmd, new_plugin, plan, plugins_cmd, support_matrix_cmd, train

COMMANDS = {"demo": demo, "plugins": plugins_cmd, "doctor": doctor, "inspect": inspect_cmd, "plan": plan,
            "new-plugin": new_plugin, "support-matrix": support_matrix_cmd, "train": train, "export": export_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corept", description="Fast, lean LLM fine-tuning through architecture plugins.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also COREPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in COMMANDS.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=getattr(mod, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from corept.errors import CoreptError

    if args.debug or os.environ.get("COREPT_DEBUG", "") not in ("", "0"):
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except CoreptError as exc:
        print(f"corept: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corept: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `corept plugins | head -1`: the reader is gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays quiet
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        where = getattr(exc, "filename", None)
        print(f"corept: error: {type(exc).__name__}: {exc}" + (f" ({where})" if where and str(where) not in str(exc)
                                                              else ""), file=sys.stderr)
        print("corept: run again with --debug (or COREPT_DEBUG=1) for the traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
