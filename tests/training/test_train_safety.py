"""``corept train`` loses nothing and says what it did (issue 20, items 2, 3, 8 and 11).

* an impossible ``--output`` fails before the model loads;
* the no-argument run follows the same overwrite rules as explicit runs; ``--overwrite`` leaves
  no stale ``merged/`` beside a new adapter;
* Ctrl-C during training stops cleanly and saves the adapters trained so far;
* ``--max-steps`` far beyond the data warns with the number of epochs;
* third-party telemetry is off during a run unless ``COREPT_ALLOW_TELEMETRY=1``;
* a bad ``--optim`` or ``--targets`` is refused before the model loads.
"""
from __future__ import annotations

import json

import pytest
import training_helpers as h
from transformers import TrainerCallback

import corept.training.trainers as trainers
from corept.cli import build_parser, main
from corept.cli.train import options_from_args
from corept.errors import InvalidOptionsError
from corept.training.options import finalize, validate
from corept.training.safety import epochs_warning


@pytest.fixture
def sft_data(tmp_path):
    return str(h.write_jsonl(tmp_path / "sft.jsonl", h.rows("sft", 8)))



def _train(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--output", str(out), "--max-steps", "2", "--batch-size", "4",
            "--lr", "1e-2", "--r", "4", *extra]


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_impossible_output_fails_before_loading(tiny_chat, sft_data, tmp_path, capsys, no_model_load, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if where == "under-a-file" else "/proc/corept-out"
    assert main(_train(tiny_chat, sft_data, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("corept: error: --output") and ("cannot write there" in err or "not a folder" in err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, match", [
    (["--optim", "adamw_torhc"], "--optim 'adamw_torhc' is not an optimizer the HF Trainer knows"),
    (["--targets", "q_proj,qkv_projj"], r"target_modules \['qkv_projj'\] match no module"),
])
def test_bad_options_fail_with_one_line(tiny_chat, sft_data, tmp_path, capsys, argv, match):
    rc = main(_train(tiny_chat, sft_data, tmp_path / "out", *argv))
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("corept:")]  # (transformers' progress bars aside)
    assert rc == 2 and "Traceback" not in err and 1 <= len(ours) <= 2, err
    assert __import__("re").search(match, err), err


def test_the_no_argument_run_follows_the_overwrite_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("COREPT_CACHE", str(tmp_path))
    monkeypatch.setenv("COREPT_DEMO_MODEL", "tiny")
    out = tmp_path / "runs" / "demo-sft"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    args = build_parser().parse_args(["train"])
    with pytest.raises(InvalidOptionsError, match="not empty; choose a new folder or pass --overwrite"):
        validate(finalize(options_from_args(args), on_gpu=False))
    validate(finalize(options_from_args(build_parser().parse_args(["train", "--overwrite"])), on_gpu=False))


def test_overwrite_leaves_no_stale_merged_folder(tiny_chat, sft_data, tmp_path):
    out = tmp_path / "out"
    assert main(_train(tiny_chat, sft_data, out)) == 0
    assert (out / "merged" / "config.json").is_file()
    (out / "merged" / "mine.txt").write_text("kept")  # not corept's: stays
    assert main(_train(tiny_chat, sft_data, out, "--save-method", "lora", "--overwrite")) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["merged"] is None and not (out / "merged" / "config.json").exists()
    assert (out / "merged" / "mine.txt").read_text() == "kept"


class _CtrlC(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


@pytest.fixture
def ctrl_c_at(monkeypatch):
    def arm(step: int):
        real = trainers.build_trainer

        def build(*args, **kwargs):
            trainer = real(*args, **kwargs)
            trainer.add_callback(_CtrlC(step))
            return trainer
        monkeypatch.setattr(trainers, "build_trainer", build)
    return arm


def test_ctrl_c_saves_the_adapters_trained_so_far(tiny_chat, sft_data, tmp_path, capsys, ctrl_c_at):
    ctrl_c_at(2)
    out = tmp_path / "out"
    assert main(_train(tiny_chat, sft_data, out, "--max-steps", "1000")) == 130
    text = capsys.readouterr().out
    assert "interrupted at step 2: saving the adapters trained so far" in text
    assert f"adapter (LoRA, safetensors, step 2): {out / 'adapter'}" in text
    assert "is 500 epochs of these 8 rows" in text  # --max-steps 1000 x 4 rows on 8 rows
    rec = json.loads((out / "run.json").read_text())
    assert rec["interrupted_at_step"] == 2 and rec["merged"] is None
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "merged").exists()


def test_epochs_warning():
    assert epochs_warning(None, 8, 4) is None and epochs_warning(40, 8, 4) is None
    assert "is 25 epochs of these 8 rows" in epochs_warning(50, 8, 4)


@pytest.mark.parametrize("allow", [False, True])
def test_third_party_telemetry_is_off_during_a_run(tiny_chat, sft_data, tmp_path, monkeypatch, allow):
    from huggingface_hub import constants

    seen = []

    class Look(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            seen.append(constants.HF_HUB_DISABLE_TELEMETRY)

    real = trainers.build_trainer
    monkeypatch.setattr(trainers, "build_trainer", lambda *a, **k: (t := real(*a, **k)).add_callback(Look()) or t)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    if allow:  # (offline still: this machine reaches no hub; corept only has to leave the switch alone)
        monkeypatch.setenv("COREPT_ALLOW_TELEMETRY", "1")
    assert main(_train(tiny_chat, sft_data, tmp_path / "out")) == 0
    assert seen == [allow is False]
    assert constants.HF_HUB_DISABLE_TELEMETRY is False  # restored after the run
