"""``corept new-plugin`` renders a plugin package that installs and passes the conformance kit.

The test follows docs/writing-a-plugin.md for OLMo 2 (``olmo2``, not covered by the built-in
plugins): render, declare the quirks the tutorial derives from the modeling file, pip-install the
package into a temporary target, and run its rendered conformance test in a subprocess whose
``PYTHONPATH`` holds only that target and the corept + corept-kernels install this test runs from.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import importlib_metadata
import pytest

from corept.cli import main as cli_main
from corept.cli.new_plugin import guess_class_prefix, render
from corept.errors import InvalidOptionsError

TUTORIAL_NUMERICS = 'numerics=Numerics(norm_casting="scale_in_fp32"),'


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
    # step 3 of the tutorial: declare OLMo 2's norm, which multiplies by the weight in fp32
    edited, n = re.subn(r"( *)numerics=Numerics\(\),.*\n", rf"\1{TUTORIAL_NUMERICS}\n", source)
    assert n == 1
    init.write_text(edited)
    # the kit minus its slowest cases (bf16, 4-bit and convergence: the shipped and example plugins run
    # those); every contract check and the fp32 matrix run
    run = _install_and_test(tmp_path, [out], [out / "tests"], "-k", "not 4bit and not convergence and not bf16")
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    # the kit's pytest11 plugin turned the interpreter on (no CUDA here) and the plugin was found
    # (pytest's header lines, printed without -q)
    assert "TRITON_INTERPRET=1 (set by corept.testing" in run.stdout, log
    assert "olmo2(olmo2)" in run.stdout, log
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 19 and " failed" not in run.stdout, log  # 8 fp32 matrix cases + 11 checks (no quirk probes)


def _install_and_test(tmp_path, dists, tests, *pytest_args, plugins=None):
    """pip-install ``dists`` into one target and run pytest on ``tests`` in a subprocess whose
    ``PYTHONPATH`` is that target and the core install (``COREPT_PLUGINS`` limits the plugins)."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--no-build-isolation", "--target", str(target), *map(str, dists)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "COREPT_PLUGINS")}
    env.update(PYTHONPATH=f"{target}{os.pathsep}{core_site()}", HF_HUB_OFFLINE="1")
    if plugins is not None:
        env["COREPT_PLUGINS"] = ",".join(plugins)
    return subprocess.run([sys.executable, "-P", "-m", "pytest", *map(str, tests), "-p", "no:cacheprovider",
                           "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning", *pytest_args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1500)


#: model_type -> None (the rendered plugin passes as rendered) or the hint its failure must give
RENDERED = {
    "llama": None, "mistral": None, "qwen3": None, "olmo2": None,
    "gemma": "norm_offset=0 and norm_casting",         # 1 + w norms: declare Numerics(norm_offset=1.0, ...)
    "phi3": "declare them with corept.Projections",    # fused qkv_proj / gate_up_proj
    "granite": "declare its head-side math in Numerics",  # logits / config.logits_scaling
}


def test_rendered_plugins_pass_or_name_the_quirk_to_handle(tmp_path):
    """``corept new-plugin`` for model types the shipped or example plugins claim (and OLMo 2): the
    rendered tests pass where the default declaration matches the model, and otherwise fail with
    a message naming what to declare. (The shipped plugins are kept out with COREPT_PLUGINS.)"""
    dists, tests = [], []
    for model_type in RENDERED:
        name = f"r{model_type}"
        out = tmp_path / name
        render(name, model_type=model_type, output=out)
        (out / "tests" / "test_conformance.py").rename(out / "tests" / f"test_{name}.py")
        dists.append(out)
        tests.append(out / "tests")
    run = _install_and_test(tmp_path, dists, tests, "-k", "declaration_and_report or quirks_are_declared",
                            plugins=[f"r{m}" for m in RENDERED])
    log = run.stdout[-8000:] + run.stderr[-2000:]
    for model_type, hint in RENDERED.items():
        name = f"r{model_type}"
        failed = re.findall(rf"FAILED .*test_{name}\.py::\S+", run.stdout)
        if hint is None:
            assert not failed and f"test_{name}.py" in run.stdout, log
        else:
            assert failed, f"{model_type}: the rendered plugin passed, but it does not handle its quirks\n{log}"
            assert hint in run.stdout, f"{model_type}: no failure names {hint!r}\n{log}"


def test_the_printed_next_step_installs_into_the_venv(tmp_path):
    """``.venv/bin/corept new-plugin`` prints a pip command that resolves offline in that venv: pip
    must see corept and corept-kernels as installed (pip's ``--dry-run`` builds and resolves, and
    installs nothing, so the shared venv stays clean)."""
    launcher = Path(sys.executable).parent / "corept"
    if not launcher.is_file():
        pytest.fail(f"{launcher} is missing: `make install` links corept into the venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1")
    run = subprocess.run([str(launcher), "new-plugin", "acme", "--model-type", "olmo2", "--output",
                          str(tmp_path / "corept-acme")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    step = next(line.strip() for line in run.stdout.splitlines() if " -m pip install" in line)
    assert step.startswith(sys.executable) and step.endswith(str(tmp_path / "corept-acme")), step
    pip = subprocess.run(shlex.split(step) + ["--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0 and "Would install corept-acme-0.1.0" in pip.stdout, pip.stdout + pip.stderr
