"""Reading a model folder: every failure names the file and what to do (issue 20, items 9 and 10).

Each case breaks a saved tiny model the way disks and downloads do, then checks ``corept.load``
(the error or warning) and the CLI (one or two lines on stderr, exit 2, no traceback unless
``--debug``).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch

import corept
from corept.errors import CheckpointError
import tiny


@pytest.fixture
def folder(tmp_path):
    return tiny.save_tiny(tmp_path / "m", "llama")


def _cli(*argv):
    proc = subprocess.run([sys.executable, "-P", "-m", "corept", *argv], capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.startswith("corept:")], proc.stderr


def test_corrupt_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON .* restore the file"):
        corept.load(str(folder))
    rc, lines, err = _cli("inspect", str(folder))
    assert rc == 2 and len(lines) == 1 and "config.json is not valid JSON" in lines[0] and "Traceback" not in err


def test_unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    with pytest.raises(CheckpointError, match=r"names model_type 'no_such_arch', which transformers .* does not know"):
        corept.load(str(folder))


def test_truncated_safetensors_is_named(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        corept.load(str(folder))
    rc, lines, err = _cli("--debug", "inspect", str(folder))  # inspect reads the config only: fine
    assert rc == 0, err


def test_missing_weights_are_reported_and_refused_with_strict(folder, caplog):
    weights = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="corept"):
        corept.load(str(folder))
    assert "1 weight(s) the model needs are not in the checkpoint and were initialised at random: " \
           "model.layers.1.mlp.down_proj.weight" in caplog.text
    with pytest.raises(CheckpointError, match="strict=True refuses such a checkpoint"):
        corept.load(str(folder), strict=True)


class _Raiser:
    @corept.hookimpl(tryfirst=True)
    def corept_patch_norm(self, arch, module, model):
        raise RuntimeError("the raiser plugin is broken")


def test_a_hook_raising_during_patch_names_its_plugin():
    corept.register_plugin(_Raiser(), "raiser")
    try:
        with pytest.raises(corept.PluginHookError, match=r"corept plugin 'raiser' raised RuntimeError: the raiser "
                                                         r"plugin is broken in corept_patch_norm for LlamaRMSNorm"):
            corept.patch(tiny.tiny_model("llama"))
    finally:
        corept.unregister_plugin("raiser")


def test_cli_debug_shows_the_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{")
    rc, lines, err = _cli("inspect", str(tmp_path))
    assert rc == 2 and "Traceback" not in err
    rc, _, err = _cli("--debug", "inspect", str(tmp_path))
    assert rc != 0 and "Traceback" in err


def test_new_plugin_refuses_a_crafted_model_type(tmp_path):
    from corept.cli.new_plugin import render

    with pytest.raises(corept.InvalidOptionsError, match="is not a model_type"):
        render("evil", model_type='x"); __import__("os").system("touch pwned"); ("', output=tmp_path / "p")
    assert not (tmp_path / "p").exists()
