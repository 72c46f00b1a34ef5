"""``corept new-plugin`` renders a plugin package that installs and passes the conformance kit.

The test follows docs/writing-a-plugin.md for OLMo 2 (``olmo2``, not covered by the built-in
plugins): render, declare the quirks the tutorial derives from the modeling file, pip-install the
package into a temporary target, and run its rendered conformance test in a subprocess whose
``PYTHONPATH`` holds only that target and the corept + corept-kernels install this test runs from.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import pytest

from corept.cli import main as cli_main
from corept.cli.new_plugin import guess_class_prefix, render
from corept.errors import InvalidOptionsError

TUTORIAL_QUIRKS = 'quirks=Quirks(norm_casting="gemma", norm_offset=0.0, mlp_activation="swiglu", qk_norm=True),'


def core_site() -> Path:
    """The folder holding the installed corept (with its entry points) and corept_kernels."""
    site = Path(importlib_metadata.distribution("corept").locate_file(""))
    if not (site / "corept_kernels").is_dir():
        pytest.skip(f"corept_kernels is not installed next to corept in {site} (run `make install`)")
    return site


def test_render_checks_its_inputs(tmp_path):
    with pytest.raises(InvalidOptionsError):
        render("Bad-Name", output=tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidOptionsError, match="not empty"):
        render("olmo2", output=tmp_path / "full")
    assert guess_class_prefix("olmo2") == "Olmo2" and guess_class_prefix("qwen3_moe") == "Qwen3Moe"


def test_rendered_olmo2_plugin_installs_and_passes_the_kit(tmp_path):
    out = tmp_path / "corept-olmo2"
    assert cli_main(["new-plugin", "olmo2", "--output", str(out)]) == 0
    pyproject = (out / "pyproject.toml").read_text()
    assert '[project.entry-points.corept]\nolmo2 = "corept_olmo2:plugin"' in pyproject
    init = out / "corept_olmo2" / "__init__.py"
    source = init.read_text()
    assert 'ModuleRoles.standard("Olmo2")' in source and "ArchitecturePlugin" in source and "@hookimpl" in source
    assert "class TestOlmo2(ConformanceSuite)" in (out / "tests" / "test_conformance.py").read_text()
    # step 3 of the tutorial: declare OLMo 2's quirks
    edited, n = re.subn(r"(# quirks: begin\n)\s*quirks=.*\n(\s*# quirks: end)", rf"\1    {TUTORIAL_QUIRKS}\n\2", source)
    assert n == 1
    init.write_text(edited)

    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--no-build-isolation", "--target", str(target), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "corept_olmo2" / "__init__.py").is_file()

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "COREPT_PLUGINS")}
    env.update(PYTHONPATH=f"{target}{os.pathsep}{core_site()}", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-P", "-m", "pytest", str(out / "tests"), "-p", "no:cacheprovider",
                          "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200)
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    # the kit's pytest11 plugin turned the interpreter on (no CUDA here) and the plugin was found
    # (pytest's header lines, printed without -q)
    assert "TRITON_INTERPRET=1 (set by corept.testing" in run.stdout, log
    assert "olmo2(olmo2)" in run.stdout, log
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 25 and " failed" not in run.stdout, log  # 19 matrix cases + 9 checks, bf16 LoRA xfail
