"""``corept new-plugin NAME``: render a working architecture plugin package from corept's template.

The result (``corept-NAME/`` by default) holds a ``pyproject.toml`` with the ``corept`` entry
point, the declaration through :class:`corept.ArchitecturePlugin` with one hook written out, a
README and a conformance test subclassing :class:`corept.testing.ConformanceSuite`. Install it
with ``pip install ./corept-NAME`` and run ``pytest corept-NAME/tests``: for a model whose quirks
the default declaration already matches it passes; otherwise it fails with the quirk to declare.
"""
from __future__ import annotations

import keyword
import re
import shlex
import string
import sys
from importlib import resources
from pathlib import Path

from corept.errors import InvalidOptionsError

HELP = "render a new architecture plugin package from the template"
TEMPLATE = "plugin"
PACKAGE_DIR = "__package__"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: a config.model_type as transformers names them (letters, digits, "_", "-", "."): nothing that could
#: end the string literal it is rendered into
_MODEL_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def add_arguments(p) -> None:
    p.add_argument("name", help="plugin name (lowercase, e.g. mymodel): entry point NAME, package corept_NAME")
    p.add_argument("--model-type", help="config.model_type the plugin claims (default: NAME)")
    p.add_argument("--class-prefix", help="transformers class prefix, e.g. MyModel for MyModelAttention "
                                          "(default: read from transformers, else NAME capitalised)")
    p.add_argument("--output", help="folder to create (default: ./corept-NAME)")
    p.add_argument("--force", action="store_true", help="overwrite files in an existing folder")


def guess_class_prefix(model_type: str) -> str:
    """The prefix of transformers' ``*ForCausalLM`` class for ``model_type``, else a capitalised guess."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if isinstance(cls, str) and cls.endswith("ForCausalLM"):
            return cls[: -len("ForCausalLM")]
    except Exception:  # noqa: BLE001 - the guess below is good enough without transformers
        pass
    return "".join(part.capitalize() for part in model_type.split("_"))


def template_files() -> list[tuple[str, str]]:
    """``(relative path, text)`` of every template file (``.tmpl`` suffix kept)."""
    root = resources.files("corept") / "templates" / TEMPLATE
    out = []

    def walk(node, rel):
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, f"{rel}{child.name}/")
            elif child.name.endswith(".tmpl"):
                out.append((rel + child.name, child.read_text(encoding="utf-8")))

    walk(root, "")
    if not out:
        raise InvalidOptionsError(f"corept's plugin template is missing ({root}); reinstall corept")
    return out


def render(name: str, *, model_type: str | None = None, class_prefix: str | None = None,
           output: str | Path | None = None, force: bool = False) -> Path:
    """Write the plugin package for ``name`` and return its folder."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise InvalidOptionsError(f"plugin name {name!r} must be lowercase letters, digits and '_', "
                                  f"starting with a letter")
    model_type = model_type or name
    if not _MODEL_TYPE.match(model_type):
        raise InvalidOptionsError(f"--model-type {model_type!r} is not a model_type (letters, digits, '_', '-', '.')")
    prefix = class_prefix or guess_class_prefix(model_type)
    if not prefix.isidentifier():
        raise InvalidOptionsError(f"class prefix {prefix!r} is not a Python identifier")
    values = {"name": name, "model_type": model_type, "class_prefix": prefix, "package": f"corept_{name}",
              "dist": f"corept-{name.replace('_', '-')}", "const": re.sub(r"\W", "_", model_type).upper()}
    folder = Path(output) if output else Path.cwd() / values["dist"]
    if folder.exists() and any(folder.iterdir()) and not force:
        raise InvalidOptionsError(f"{folder} exists and is not empty; pass --force to overwrite")
    for rel, text in template_files():
        target = folder / rel[: -len(".tmpl")].replace(PACKAGE_DIR, values["package"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(string.Template(text).substitute(values), encoding="utf-8")
    return folder


def install_command(folder: Path) -> str:
    """The pip command that installs a rendered plugin into the Python running corept.

    The plugin requires ``corept`` and ``corept-kernels``, which are installed here already, so pip
    needs no index; without build isolation it needs no network either (setuptools must be present,
    as in corept's own ``.venv``).
    """
    import importlib.util

    isolation = "" if importlib.util.find_spec("setuptools") is None else " --no-build-isolation"
    return f"{shlex.quote(sys.executable)} -m pip install{isolation} {shlex.quote(str(folder))}"


def run(args) -> int:
    folder = render(args.name, model_type=args.model_type, class_prefix=args.class_prefix, output=args.output,
                    force=args.force)
    print(f"wrote {folder}")
    print(f"next: check the declarations in {folder / ('corept_' + args.name) / '__init__.py'}, then")
    print(f"  {install_command(folder)}")
    print(f"  {shlex.quote(sys.executable)} -m pytest {shlex.quote(str(folder / 'tests'))} -q")
    return 0
