"""Install corept's own distributions into a ``--target``-style folder without building them.

``python3 -P bench/e2e.py --link-site /tmp/site_corept`` links each project's packages (as found
by its ``[tool.setuptools.packages.find]`` include/exclude) into the folder and writes a
``<name>-<version>.dist-info`` with METADATA and entry_points.txt, which is all
``importlib_metadata.entry_points(group="corept")`` needs to discover the plugins. Same result as
``pip install --no-deps --target``, with no setuptools, no build folders and no wait. Standard
library only (tomllib: Python 3.11+).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tomllib

DEFAULT_PROJECTS = (".", "kernels", "plugins/llama", "plugins/qwen", "plugins/mistral", "plugins/gemma",
                    "plugins/gpt_oss")


def _packages(project_dir: str, meta: dict) -> list[str]:
    find = meta.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    inc, exc = find.get("include", ["*"]), find.get("exclude", [])
    return sorted(n for n in os.listdir(project_dir)
                  if os.path.isfile(os.path.join(project_dir, n, "__init__.py"))
                  and any(fnmatch.fnmatch(n, p) for p in inc) and not any(fnmatch.fnmatch(n, p) for p in exc))


def _entry_points(project: dict) -> str:
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    return "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())


def link_site(target: str, repo: str, projects=DEFAULT_PROJECTS) -> list[str]:
    """Link ``projects`` (folders of ``repo`` holding a pyproject.toml) into ``target``.

    :returns: the distribution names installed. Existing links and dist-infos of the same names
        are replaced.
    """
    os.makedirs(target, exist_ok=True)
    done = []
    for rel in projects:
        pdir = os.path.abspath(os.path.join(repo, rel))
        with open(os.path.join(pdir, "pyproject.toml"), "rb") as fh:
            meta = tomllib.load(fh)
        proj = meta["project"]
        name, version = proj["name"], proj["version"]
        pkgs = _packages(pdir, meta)
        if not pkgs:
            raise RuntimeError(f"{rel}: no package found for {name}")
        for pkg in pkgs:
            dst = os.path.join(target, pkg)
            if os.path.islink(dst) or os.path.isfile(dst):
                os.remove(dst)
            elif os.path.isdir(dst):
                shutil.rmtree(dst)
            os.symlink(os.path.join(pdir, pkg), dst)
        norm = re.sub(r"[-_.]+", "_", name)
        for old in os.listdir(target):
            if old.endswith(".dist-info") and re.sub(r"[-_.]+", "_", old[:-len(".dist-info")].rsplit("-", 1)[0]) == norm:
                shutil.rmtree(os.path.join(target, old))
        dist = os.path.join(target, f"{norm}-{version}.dist-info")
        os.makedirs(dist)
        files = {"METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                 "INSTALLER": "corept-bench-link-site\n", "top_level.txt": "".join(p + "\n" for p in pkgs),
                 "entry_points.txt": _entry_points(proj)}
        for fname, text in files.items():
            with open(os.path.join(dist, fname), "w", encoding="utf-8") as fh:
                fh.write(text)
        done.append(name)
    return done
