"""The ``corept`` command line, run as ``python -P -m corept ...`` in subprocesses; JSON parsed."""
from __future__ import annotations

import importlib.util
import json
import shutil

import importlib_metadata
import pytest

from plugin_factory import run_scripts

MISTRAL_TYPES = ["mistral"] + (["ministral"] if importlib.util.find_spec("transformers.models.ministral") else [])
MODEL_TYPES = {"llama": ["llama"], "mistral": MISTRAL_TYPES, "qwen": ["qwen2", "qwen3", "qwen3_moe"],
               "gemma": ["gemma", "gemma2", "gemma3_text", "gemma3"], "gpt_oss": ["gpt_oss"]}
LIGHT_IMPORT = '''
import sys
import corept
corept.get_plugin_manager()  # loading the plugins does not import the kernels either
emit({"heavy": sorted(m for m in ("corept_kernels", "triton", "corept.components.norm", "corept.components.head")
                      if m in sys.modules)})
'''


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_folders, hub_cache):
    tmp = tmp_path_factory.mktemp("cli")
    # inspect reads the config only: folders holding nothing but config.json
    for mt in ("qwen3", "gpt2", "gemma2"):
        (tmp / mt).mkdir()
        shutil.copy(tiny_folders[mt] / "config.json", tmp / mt / "config.json")
    cmds = {
        "plugins_json": ["plugins", "--json"],
        "plugins": ["plugins"],
        "doctor_json": ["doctor", "--json"],
        "doctor": ["doctor"],
        "inspect_qwen3_json": ["inspect", str(tmp / "qwen3"), "--json"],
        "inspect_qwen3": ["inspect", str(tmp / "qwen3")],
        "inspect_gemma2_json": ["inspect", str(tmp / "gemma2"), "--json"],
        "inspect_gpt2_json": ["inspect", str(tmp / "gpt2"), "--json"],
        "inspect_gpt2": ["inspect", str(tmp / "gpt2")],
        "inspect_hub_json": ["inspect", "unsloth/Qwen3-8B", "--json"],
        "inspect_missing": ["inspect", "nobody/nothing"],
        "inspect_builtin_json": ["inspect", "unsloth/Qwen3-8B", "--json"],
    }
    env = {"inspect_hub_json": {"HF_HUB_CACHE": str(hub_cache)}, "inspect_missing": {"HF_HUB_CACHE": str(hub_cache)},
           "inspect_builtin_json": {"HF_HUB_CACHE": str(tmp / "empty-hub-cache")}}
    jobs = [dict(args=["-m", "corept", *argv], env=env.get(name)) for name, argv in cmds.items()]
    jobs.append(dict(args=["-m", "corept", "doctor", "--json"], env={"TRITON_INTERPRET": None}))
    jobs.append(dict(code=LIGHT_IMPORT))
    results = run_scripts(jobs)
    out = dict(zip([*cmds, "doctor_no_interpreter", "light_import"], results))
    out["folders"] = tmp
    return out


def _json(result):
    assert result.returncode == 0, result.explain()
    return json.loads(result.stdout)


def test_plugins_json(cli):
    rows = {r["name"]: r for r in _json(cli["plugins_json"])}
    assert set(rows) == set(MODEL_TYPES)
    for name, row in rows.items():
        assert row["loaded"] is True and row["error"] is None
        assert row["distribution"] == f"corept-{name.replace('_', '-')}"
        assert row["version"] == importlib_metadata.version(f"corept-{name}")
        assert row["model_types"] == MODEL_TYPES[name]
        assert row["hooks"] == ["corept_register_architectures"] and row["builtin"] is False
        assert row["transformers"] == ">=5.17,<6"
        assert all(row["transformers_supported"].values())


def test_plugins_text(cli):
    result = cli["plugins"]
    assert result.returncode == 0, result.explain()
    lines = result.stdout.splitlines()
    assert "qwen 0.1.0 (corept-qwen) - loaded" in lines
    assert "  model_types: qwen2, qwen3, qwen3_moe" in lines
    assert "  transformers: >=5.17,<6" in lines
    aliases = lines[lines.index("qwen 0.1.0 (corept-qwen) - loaded") + 2]
    assert "qwen2.5-7b = Qwen/Qwen2.5-7B, " in aliases and "qwen3-8b = Qwen/Qwen3-8B" in aliases, lines
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == sorted(names) == sorted(MODEL_TYPES), lines


def test_doctor_json(cli):
    info = _json(cli["doctor_json"])
    for dist in ("torch", "triton", "transformers", "peft", "trl", "bitsandbytes"):
        assert info["versions"][dist] == importlib_metadata.version(dist)
    assert info["versions"]["corept"] == importlib_metadata.version("corept")
    assert info["gpu"] is None
    assert info["triton_interpreter"] is True and info["triton_mode"] == "interpreter"
    assert info["problems"] == []
    bare = _json(cli["doctor_no_interpreter"])
    assert bare["triton_interpreter"] is False and bare["triton_mode"].startswith("torch fallbacks")


def test_doctor_text(cli):
    result = cli["doctor"]
    assert result.returncode == 0, result.explain()
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert f"torch {importlib_metadata.version('torch')}" in lines
    assert "gpu none" in lines and "no problems found" in lines
    assert "kernels run as Triton interpreter (TRITON_INTERPRET=1)" in lines
    assert sum(line.startswith("triton ") for line in lines) == 1, lines  # the version, once
    assert "plugins gemma (gemma, gemma2, gemma3_text, gemma3), gpt_oss (gpt_oss), llama (llama), mistral (" in \
        " ".join(lines), lines


def test_inspect_qwen3_json(cli):
    info = _json(cli["inspect_qwen3_json"])
    assert (info["plugin"], info["distribution"], info["model_type"]) == ("qwen", "corept-qwen", "qwen3")
    assert info["found_via"] == "local folder" and info["resolved"] == str((cli["folders"] / "qwen3").resolve())
    q = info["quirks"]
    assert q["norm_casting"] == "scale_after_cast" and q["mlp_activation"] == "swiglu"  # read from config.hidden_act
    assert info["components"] == {
        "attention": "transformers AttentionInterface: sdpa",
        "mlp": "corept on Qwen3MLP, once its probe passes",
        "rope": "corept on Qwen3Attention, once its probe passes",
        "norm": "corept on Qwen3RMSNorm, once its probe passes",
        "loss": "corept on Qwen3ForCausalLM, once its probe passes",
    }
    assert info["transformers_range"] == ">=5.17,<6"


def test_inspect_gemma2_shows_the_forced_attention(cli):
    info = _json(cli["inspect_gemma2_json"])
    assert info["plugin"] == "gemma" and info["components"]["attention"] == "transformers AttentionInterface: eager"
    assert info["quirks"]["final_logit_softcap"] == 30.0 and info["quirks"]["norm_offset"] == 1.0


def test_inspect_text(cli):
    result = cli["inspect_qwen3"]
    assert result.returncode == 0, result.explain()
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "plugin: qwen" in lines and "model_type: qwen3" in lines
    assert "norm corept on Qwen3RMSNorm, once its probe passes" in lines and "mlp_activation swiglu" in lines


def test_inspect_unknown_architecture(cli):
    info = _json(cli["inspect_gpt2_json"])
    assert info["plugin"] is None and info["model_type"] == "gpt2"
    assert set(info["components"].values()) == {"transformers (no plugin)"}
    assert "no corept plugin supports model_type 'gpt2'" in cli["inspect_gpt2_json"].stderr
    text = cli["inspect_gpt2"]
    assert text.returncode == 0, text.explain()
    assert "plugin: none - the model would load unpatched" in [" ".join(x.split()) for x in text.stdout.splitlines()]


def test_inspect_hub_id_from_the_cache(cli):
    info = _json(cli["inspect_hub_json"])
    assert (info["plugin"], info["model_type"], info["found_via"]) == ("qwen", "qwen3", "HF cache")
    assert info["resolved"].endswith("models--unsloth--Qwen3-8B/snapshots/" + "1" * 40)


def test_inspect_answers_a_declared_model_offline_from_its_builtin_config(cli):
    info = _json(cli["inspect_builtin_json"])
    assert (info["plugin"], info["model_type"]) == ("qwen", "qwen3")
    assert info["found_via"] == "built-in copy of Qwen/Qwen3-8B's config", info


def test_inspect_missing_model_is_a_clean_error(cli):
    result = cli["inspect_missing"]
    assert result.returncode == 2, result.explain()
    assert result.stderr.startswith("corept: error: ") and "'nobody/nothing'" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and ".." not in result.stderr
    assert "Traceback" not in result.stderr


def test_import_corept_does_not_import_kernels(cli):
    """pytest loads corept's pytest11 plugin before any conftest: neither ``import corept`` nor loading
    the plugins may run the kernels' @triton.jit decorators (they would miss TRITON_INTERPRET=1 set
    by a conftest, and every kernel launch on CPU would then fail)."""
    result = cli["light_import"]
    assert result.returncode == 0 and result.data == {"heavy": []}, result.explain()


def test_console_script_and_pytest_plugin_are_declared():
    eps = importlib_metadata.entry_points()
    assert eps.select(group="console_scripts")["corept"].value == "corept.cli:main"
    assert eps.select(group="pytest11")["corept"].value == "corept.testing.pytest_plugin"



def test_a_closed_pipe_is_no_error():
    """``corept plugins | head -1``: the reader is gone before corept writes (closed here at once,
    while corept still imports); corept ends quietly, with no error line."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-P", "-m", "corept", "plugins", "--all"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "error" not in err, err
