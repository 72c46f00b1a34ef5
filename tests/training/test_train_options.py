"""Options of ``corept train``: profiles, the planner hook, validation, and nothing written on failure."""
import pytest
import training_helpers as h

from corept.errors import CoreptError, InvalidOptionsError
from corept.training import profiles
from corept.training.options import TrainOptions, finalize, validate


def _opts(tmp_path, **kw):
    values = dict(model="m", data="d", output=str(tmp_path / "out"))
    values.update(kw)
    return TrainOptions(**values)


@pytest.mark.parametrize("name,seq,bs,ga,r", [("small", 2048, 4, 1, 64), ("medium", 1024, 2, 4, 32),
                                              ("large", 256, 1, 8, 16)])
def test_profiles_follow_the_rtx3090_table(tmp_path, name, seq, bs, ga, r):
    gpu = finalize(_opts(tmp_path, profile=name), on_gpu=True)
    assert (gpu.max_seq_length, gpu.batch_size, gpu.grad_accum, gpu.r, gpu.lora_alpha) == (seq, bs, ga, r, r)
    assert gpu.optim == "adamw_8bit"
    assert finalize(_opts(tmp_path, profile=name), on_gpu=False).optim == "adamw_torch"


def test_explicit_flags_beat_the_profile(tmp_path):
    o = finalize(_opts(tmp_path, profile="medium", r=8, batch_size=3, optim="sgd"), on_gpu=True)
    assert (o.r, o.lora_alpha, o.batch_size, o.grad_accum, o.max_seq_length, o.optim) == (8, 8, 3, 4, 1024, "sgd")


def test_defaults_without_profile(tmp_path):
    o = finalize(_opts(tmp_path, method="dpo"), on_gpu=False)
    assert (o.max_seq_length, o.batch_size, o.grad_accum, o.r, o.lora_alpha, o.lr) == (1024, 2, 1, 16, 16, 5e-5)
    assert finalize(_opts(tmp_path, full_finetuning=True), on_gpu=False).lr == 2e-5
    assert finalize(_opts(tmp_path, targets="q_proj, v_proj"), on_gpu=False).targets == ["q_proj", "v_proj"]


def test_auto_profile_asks_the_planner(tmp_path, monkeypatch):
    calls = []

    def planner(**kw):
        calls.append(kw)
        return {"max_seq_length": 512, "batch_size": 8, "grad_accum": 2, "r": 32, "optim": "adamw_8bit"}

    monkeypatch.setitem(profiles.PLANNERS, "auto", planner)
    o = finalize(_opts(tmp_path, profile="auto", load_in_4bit=True, batch_size=8), on_gpu=True)
    assert calls == [dict(model="m", method="qlora", max_seq_length=None, batch_size=8, r=None, optim="adamw_8bit")]
    assert (o.max_seq_length, o.batch_size, o.grad_accum, o.r, o.lora_alpha, o.optim) == (512, 8, 2, 32, 32,
                                                                                            "adamw_8bit")


def test_planner_errors_and_registration(tmp_path, monkeypatch):
    def broken(**kw):
        raise CoreptError("does not fit on rtx3090; smallest change: --max-seq-length 512")

    monkeypatch.setitem(profiles.PLANNERS, "auto", broken)
    with pytest.raises(InvalidOptionsError, match="--profile auto: the planner could not size this run: does not"):
        finalize(_opts(tmp_path, profile="auto"), on_gpu=True)
    monkeypatch.setattr(profiles, "PLANNERS", dict(profiles.PLANNERS))
    profiles.register_planner("mine", lambda **kw: {"r": 4})
    assert "mine" in profiles.profile_names() and finalize(_opts(tmp_path, profile="mine"), on_gpu=False).r == 4
    with pytest.raises(InvalidOptionsError, match="preset"):
        profiles.register_planner("small", lambda **kw: {})
    with pytest.raises(InvalidOptionsError, match="unknown"):
        finalize(_opts(tmp_path, profile="nope"), on_gpu=False)


@pytest.mark.parametrize("kw,message", [
    (dict(load_in_4bit=True, load_in_8bit=True), "exclusive"),
    (dict(full_finetuning=True, load_in_4bit=True), "cannot train quantized weights"),
    (dict(full_finetuning=True, save_method="lora"), "--save-method lora saves adapters"),
    (dict(method="kto", batch_size=1), "--batch-size >= 2"),
    (dict(method="ppo"), "--method must be one of"),
    (dict(r=0), "--r must be a positive integer"),
    (dict(lr=-1.0), "--lr must be a positive number"),
    (dict(lr=float("nan")), "--lr must be a positive number"),
    (dict(max_steps=0), "--max-steps must be a positive integer"),
    (dict(epochs=0.0), "--epochs must be a positive number"),
    (dict(save_method="gguf"), "--save-method must be one of"),
    (dict(save_gguf="q4km"), "GGUF quantization 'q4km' unknown"),
    (dict(save_gguf="q8_0", distributed="ddp"), "--save-gguf is not written by distributed runs"),
    (dict(gradient_checkpointing="sometimes"), "--gradient-checkpointing must be one of"),
    (dict(output=None), "--output DIR is required"),
])
def test_validation_errors(tmp_path, kw, message):
    with pytest.raises(InvalidOptionsError, match=message.replace("(", r"\(")):
        validate(finalize(_opts(tmp_path, **kw), on_gpu=False))


def test_output_must_be_new_or_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InvalidOptionsError, match="not empty"):
        validate(finalize(_opts(tmp_path), on_gpu=False))
    validate(finalize(_opts(tmp_path, overwrite=True), on_gpu=False))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidOptionsError, match="not a folder"):
        validate(finalize(_opts(tmp_path, output=str(tmp_path / "file")), on_gpu=False))


@pytest.mark.parametrize("case", ["bad-data", "bad-option", "missing-model", "model-without-data"])
def test_cli_writes_nothing_before_validation(tiny_chat, tmp_path, capsys, case):
    from corept.cli import main

    data = h.write_jsonl(tmp_path / "d.jsonl", h.rows("sft", 3) + [{"prompt": "q"}])
    out = tmp_path / "out"
    argv = {"bad-data": ["--model", tiny_chat, "--data", str(data)],
            "bad-option": ["--model", tiny_chat, "--data", str(data), "--r", "0"],
            "missing-model": ["--model", str(tmp_path / "no-model"), "--data", str(data)],
            "model-without-data": ["--model", tiny_chat, "--method", "kto", "--batch-size", "1"]}[case]
    assert main(["train", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"bad-data": "row 3 (line 4) lacks 'completion'", "bad-option": "--r must be a positive integer",
                "missing-model": "no-model", "model-without-data": "--batch-size >= 2"}[case]
    assert expected in err, err
    assert not out.exists()


def test_kto_weights_balance_the_labels():
    from datasets import Dataset

    from corept.training.trainers import kto_weights

    assert kto_weights(Dataset.from_dict({"label": [True] * 4 + [False] * 2})) == {"undesirable_weight": 2.0}
    assert kto_weights(Dataset.from_dict({"label": [True] * 2 + [False] * 6})) == {"desirable_weight": 3.0}
    assert kto_weights(Dataset.from_dict({"label": [True, False]})) == {}


def test_sft_packs_by_default_and_only_sft_packs(tmp_path):
    from corept.training.trainers import trl_config

    sft, dpo = (finalize(_opts(tmp_path, method=m), on_gpu=False) for m in ("sft", "dpo"))
    assert sft.packing is True and dpo.packing is False
    config = trl_config("sft", sft, output_dir=str(tmp_path / "trl"), gpu=False, dtype=None)
    assert config.packing and config.packing_strategy == "bfd" and config.max_length == sft.max_seq_length
    padded = finalize(_opts(tmp_path, packing=False), on_gpu=False)
    assert not trl_config("sft", padded, output_dir=str(tmp_path / "trl"), gpu=False, dtype=None).packing
    with pytest.raises(InvalidOptionsError, match="--packing applies to sft"):
        validate(finalize(_opts(tmp_path, method="kto", packing=True), on_gpu=False))
