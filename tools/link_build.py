"""Make the corept installed in a build folder (``make install``: ``.build/all``) usable from ``.venv``.

``make`` installs corept, its kernels and the plugins with ``pip install --target .build/all`` so
that each plugin can also be tested alone (``.build/only-<plugin>``). This script, run by
``make install`` with the venv's Python, links ``.build/all`` into that venv:

* ``<site-packages>/corept-build.pth`` (through ``corept_build_link.py`` beside it) appends the
  folder to ``sys.path`` at start-up, unless an installed corept (a ``corept-<version>.dist-info``)
  is already on ``sys.path`` — as under the per-plugin test targets' ``PYTHONPATH`` — so those
  environments still see only their own plugin; ``COREPT_BUILD_LINK=0`` turns it off (a process
  that must not see corept at all);
* ``<venv>/bin/corept`` is the command (the console script's three lines, on this venv's Python).

pip sees the linked distributions as installed, so ``pip install <plugin folder>`` in the venv
resolves its ``corept`` requirement without the network.

Usage: ``python tools/link_build.py BUILD_FOLDER``
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "corept-build.pth"

# site.py executes .pth lines that start with "import": the logic lives in a module beside it.
PTH_LINE = "import corept_build_link\n"
LINK_MODULE = """\"\"\"Appends corept's build folder to sys.path (written by corept's tools/link_build.py).\"\"\"
import glob
import os
import sys

BUILD = {path!r}
INSTALLED = any(glob.glob(os.path.join(d or ".", "corept-[0-9]*.dist-info")) for d in sys.path)
if os.environ.get("COREPT_BUILD_LINK", "1") != "0" and BUILD not in sys.path and not INSTALLED:
    sys.path.append(BUILD)
"""

LAUNCHER = """#!{python}
# corept's command, linked to {build} by tools/link_build.py (make install)
import sys
from corept.cli import main
sys.exit(main())
"""


def link(build: Path) -> tuple[Path, Path]:
    """Write the ``.pth`` and the launcher for ``build``; returns their paths."""
    build = build.resolve()
    if not (build / "corept" / "__init__.py").is_file():
        raise SystemExit(f"link_build: {build} holds no installed corept (run make install)")
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / PTH_NAME
    (site / "corept_build_link.py").write_text(LINK_MODULE.format(path=str(build)), encoding="utf-8")
    pth.write_text(PTH_LINE, encoding="utf-8")
    scripts = Path(sysconfig.get_paths()["scripts"])
    launcher = scripts / "corept"
    tmp = launcher.with_name(".corept.tmp")
    tmp.write_text(LAUNCHER.format(python=sys.executable, build=build), encoding="utf-8")
    tmp.chmod(0o755)
    os.replace(tmp, launcher)
    return pth, launcher


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in link(Path(sys.argv[1])):
        print(f"linked: {path}")
