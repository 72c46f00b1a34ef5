"""``corept plan``: the table, ``--json``, exit codes and every error case."""
import json
import os
import subprocess
import sys

import pytest
from planning_helpers import tiny_config

from corept.cli import main

LLAMA = "meta-llama/Llama-3.1-8B"


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_recommend_json(capsys):
    rc, out, _ = run(capsys, "--model", LLAMA, "--method", "qlora", "--gpu", "rtx3090", "--json")
    d = json.loads(out)
    assert rc == 0 and d["fits"] is True
    rec = d["recommendation"]
    assert rec["r"] == 32 and rec["max_seq_length"] == 2048 and rec["grad_accum"] * rec["batch_size"] >= 16
    assert d["estimate"]["gpu"]["name"] == "rtx3090" and d["longest_seq_at_batch_1"] >= 2048
    assert set(d["estimate"]["components_gib"]) >= {"weights", "optimizer_states", "loss", "layer_working_set"}


def test_table_for_a_local_config_folder(capsys, tmp_path):
    tiny_config("qwen3").save_pretrained(tmp_path)
    rc, out, _ = run(capsys, "--model", str(tmp_path), "--method", "lora", "--vram", "8",
                     "--max-seq-length", "1024", "--batch-size", "2", "--r", "8")
    assert rc == 0
    for text in ("plugin qwen", "local folder", "peak allocated", "CUDA context", "allocator slack", "FITS",
                 "LoRA r8", "recommended: max_seq_length 1024, batch_size 2, gradient_accumulation_steps 8"):
        assert text in out, text


def test_table_says_what_checkpointing_auto_would_do(capsys):
    """The training default keeps every layer when it fits, and some of them on a tighter card."""
    from corept.planning import get_gpu, model_shape
    from corept.planning.recompute import keep_plan

    _, roomy, _ = run(capsys, "--model", LLAMA, "--method", "lora", "--gpu", "h100", "--max-seq-length", "2048",
                        "--batch-size", "2")
    assert "checkpointing auto" in roomy and "keeps every layer's activations (no recompute)" in roomy
    kp = keep_plan(model_shape(LLAMA), get_gpu("rtx3090"), method="qlora", seq=8192, batch=1, r=16)
    assert 0 < kp.keep_layers < kp.layers  # 24 GiB: room for some layers, not all
    _, tight, _ = run(capsys, "--model", LLAMA, "--method", "qlora", "--gpu", "rtx3090", "--max-seq-length", "8192", "--r", "16",
                        "--batch-size", "1")
    assert f"keeps the last {kp.keep_layers} of {kp.layers} layers' activations" in tight


def test_load_in_4bit_is_qlora(capsys):
    rc, out, _ = run(capsys, "--model", LLAMA, "--load-in-4bit", "--gpu", "rtx3090", "--json")
    assert rc == 0 and json.loads(out)["estimate"]["method"] == "qlora"


def test_config_that_does_not_fit_exits_1_with_suggestions(capsys):
    argv = ("--model", LLAMA, "--method", "lora", "--gpu", "rtx3090", "--max-seq-length", "8192", "--batch-size", "4")
    rc, out, _ = run(capsys, *argv)
    assert rc == 1 and "DOES NOT FIT" in out
    tail = out.split("would fit with (one change each, smallest first):")[1]
    assert tail.index("--batch-size 2") < tail.index("seq <= ") < tail.index("--method qlora") < tail.index("--gpu")
    rc, out, _ = run(capsys, *argv, "--json")
    d = json.loads(out)
    assert rc == 1 and d["fits"] is False and d["suggestions"][0].startswith("--batch-size 2")


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "rtx9090"], "unknown GPU 'rtx9090'; known GPUs: rtx3090, rtx4090, l4, t4, a100-40, a100-80, h100, h200"),
    (["--gpu", "rtx3090", "--model-override"], None),
])
def test_unknown_gpu(capsys, argv, message):
    if message is None:
        with pytest.raises(SystemExit):
            main(["plan", "--model", LLAMA, "--method", "lora", *argv])
        return
    rc, _, err = run(capsys, "--model", LLAMA, "--method", "lora", *argv)
    assert rc == 2 and message in err


def test_nothing_fits_exits_2_with_the_smallest_change(capsys):
    rc, _, err = run(capsys, "--model", "Qwen/Qwen2.5-32B", "--method", "lora", "--gpu", "rtx3090")
    assert rc == 2 and "does not fit on rtx3090" in err and "Smallest change that would fit: use --load-in-4bit" in err


def test_unreadable_config_exits_2(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", "no-such-org/no-such-model", "--method", "lora", "--gpu", "h100")
    assert rc == 2 and "cannot read the config of 'no-such-org/no-such-model'" in err
    (tmp_path / "config.json").write_text("{ broken")
    rc, _, err = run(capsys, "--model", str(tmp_path), "--method", "lora", "--gpu", "h100")
    assert rc == 2 and "cannot read the config" in err and f"{tmp_path / 'config.json'} is not valid JSON" in err


def test_method_is_required_and_consistent(capsys):
    rc, _, err = run(capsys, "--model", LLAMA, "--gpu", "h100")
    assert rc == 2 and "--method is required" in err
    rc, _, err = run(capsys, "--model", LLAMA, "--gpu", "h100", "--method", "full", "--load-in-4bit")
    assert rc == 2 and "contradicts" in err


def test_entry_point_subprocess():
    """``python -P -m corept plan`` end to end, in a fresh interpreter (no GPU: --gpu is required)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-P", "-m", "corept", "plan", "--model", "Qwen/Qwen3-8B", "--method", "qlora",
                           "--gpu", "rtx4090", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["estimate"]["model"]["model_type"] == "qwen3" and d["fits"]
    proc = subprocess.run([sys.executable, "-P", "-m", "corept", "plan", "--model", LLAMA, "--method", "lora"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU detected; name one with --gpu" in proc.stderr
