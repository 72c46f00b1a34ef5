"""Throwaway third-party corept plugin distributions, and running Python in fresh subprocesses.

Plugins are discovered through entry points at the plugin manager's first use and the manager is
cached per process, so anything that depends on what is installed or on an environment variable
runs in a subprocess: :func:`run_scripts` starts several at once (they are mostly import time) and
each script reports back one JSON object through :func:`emit`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
MARKER = "@@COREPT-TEST-RESULT@@"
MAX_PARALLEL = max(2, min(4, os.cpu_count() or 2))

# the PYTHONPATH the test run was started with (e.g. .build/all), made absolute
BASE_PYTHONPATH = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "throwaway corept plugin written by corept's tests"
requires-python = ">=3.10"

[project.entry-points.corept]
{entry} = "{target}"

[tool.setuptools.packages.find]
include = ["{package}*"]
"""


def write_plugin_dist(root: os.PathLike, name: str, source: str, *, version: str = "0.1.0",
                      attr: str | None = None, entry: str | None = None) -> Path:
    """Write a plugin distribution ``corept-<name>`` into ``root/<name>``.

    Its import package ``corept_<name>`` holds ``source`` as ``__init__.py``; the entry point
    ``<name>`` (or ``entry``; group ``corept``) points at the module, or at ``module:attr``.
    :returns: the distribution's folder (what ``pip install`` takes).
    """
    package = f"corept_{name}"
    folder = Path(root) / name
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(textwrap.dedent(source))
    target = package if attr is None else f"{package}:{attr}"
    (folder / "pyproject.toml").write_text(PYPROJECT.format(dist=f"corept-{name}", version=version, entry=entry or name,
                                                           target=target, package=package))
    return folder


def pip_install(dists: list[os.PathLike], target: os.PathLike) -> Path:
    """``pip install --no-deps --no-build-isolation --target <target> <dists>``, offline."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-q", "--target", str(target), *map(str, dists)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return Path(target)


def make_plugin(tmp_path: Path, name: str, source: str, **kw) -> Path:
    """Write and pip-install one plugin distribution; returns the site folder to put on PYTHONPATH."""
    dist = write_plugin_dist(tmp_path / "src", name, source, **kw)
    return pip_install([dist], tmp_path / f"site-{name}")


# -- subprocesses -------------------------------------------------------------------------------
PRELUDE = """\
import json, logging, os, sys
MARKER = @MARKER@
def emit(obj):
    print(MARKER + json.dumps(obj, default=str), flush=True)
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")
def capture_logs(name="corept", level=logging.DEBUG):
    # every record of logger `name` at `level` or above, as 'LEVEL name: message' lines
    handler = _Lines()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler.lines
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    data: dict | None

    def explain(self) -> str:
        return f"rc={self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-6000:]}"


def _env(env: dict | None, site: list[os.PathLike] | None) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("COREPT_")}
    full["PYTHONPATH"] = os.pathsep.join([*map(str, site or []), str(TESTS_DIR), *BASE_PYTHONPATH])
    full["HF_HUB_OFFLINE"] = "1"
    full["TRITON_INTERPRET"] = "1"
    full["TOKENIZERS_PARALLELISM"] = "false"
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return full


def _parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def run_scripts(jobs: list[dict], timeout: float = 240) -> list[Result]:
    """Run several subprocesses at once; each job is a dict with

    ``code`` (a Python script; :func:`emit` is predefined) or ``args`` (argv after ``python -P``),
    optional ``env`` (overrides; ``None`` removes a variable), ``site`` (folders prepended to
    PYTHONPATH) and ``cwd``. Returns one :class:`Result` per job, in order.
    """
    def start(job):
        if "code" in job:
            argv = ["-c", PRELUDE.replace("@MARKER@", repr(MARKER)) + textwrap.dedent(job["code"])]
        else:
            argv = list(job["args"])
        return subprocess.Popen([sys.executable, "-P", *argv], env=_env(job.get("env"), job.get("site")),
                                cwd=job.get("cwd", REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n[killed after {timeout}s]"
        return Result(p.returncode, out, err, _parse(out))

    # a few at a time: they are CPU-bound imports, more than the cores only adds memory
    with ThreadPoolExecutor(max_workers=MAX_PARALLEL) as pool:
        return list(pool.map(lambda job: finish(start(job)), jobs))


def run_script(code: str, **job) -> Result:
    """Run one script (see :func:`run_scripts`)."""
    return run_scripts([dict(code=code, **job)])[0]


def ok(result: Result) -> dict:
    """The JSON a script emitted, asserting it exited 0 and emitted one."""
    assert result.returncode == 0 and result.data is not None, result.explain()
    return result.data
