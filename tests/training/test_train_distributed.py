"""``corept train`` under ``torchrun`` and ``accelerate launch``: DDP on CPU (gloo) = one process, global batch.

Two processes with ``--batch-size 2`` see, step by step, the same 4 rows as one process with
``--batch-size 4`` (TRL/accelerate shard each global batch across the ranks), so with plain SGD
the saved adapters must agree to rounding. The control — one process with batch 2, i.e. other
rows per step — must not. Rows differ in length, so each rank pads differently. ~45 s.
"""
import json
import subprocess
import sys

import pytest
import training_helpers as h
from safetensors.torch import load_file

from corept.cli import main
from corept.errors import InvalidOptionsError

ANSWERS = ["corept patches transformers models with Triton kernels.", "Module instances, one at a time.",
           "Triton kernels with torch twins.", "Faster than plain transformers on GPUs, yes.",
           "Yes: SFT, DPO and KTO through TRL.", "Under plugins, one per family.",
           "Adapters on the seven projections, fused.", "With FSDP2 across GPUs."]


def _data(tmp_path):
    rows = [{"prompt": h.conv("user", f"Question {i}: {h.Q}"), "completion": h.conv("assistant", a)}
            for i, a in enumerate(ANSWERS)]
    return h.write_jsonl(tmp_path / "sft.jsonl", rows)


def _args(model, data, out, batch: int) -> list[str]:
    return ["train", "--model", model, "--data", str(data), "--output", str(out), "--max-steps", "3",
            "--max-seq-length", "64", "--optim", "sgd", "--lr", "0.05", "--save-method", "lora",
            "--batch-size", str(batch)]


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


LAUNCHERS = {  # (launcher argv before "-m corept", extra corept train flags)
    "torchrun": (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], ["--distributed", "ddp"]),
    "accelerate": (["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"], []),  # DDP by default when launched
}


def test_ddp_train_equals_one_process_on_the_global_batch(tiny_chat, tmp_path, corept_env):
    data = _data(tmp_path)
    env = dict(corept_env, OMP_NUM_THREADS="1")
    adapters = {}
    for name, (launcher, flags) in LAUNCHERS.items():
        cmd = [sys.executable, "-P", *launcher, "-m", "corept", *_args(tiny_chat, data, tmp_path / name, 2), *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-5000:])
        assert proc.stdout.count("distributed: ddp, 2 processes") == 1, name  # rank 0 alone prints
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["greedy_patched_equals_unpatched"] is True
        adapters[name] = _adapter(tmp_path / name)
    assert main(_args(tiny_chat, data, tmp_path / "one4", 4)) == 0
    assert main(_args(tiny_chat, data, tmp_path / "one2", 2)) == 0
    one4, one2 = _adapter(tmp_path / "one4"), _adapter(tmp_path / "one2")
    for name, ddp in adapters.items():
        moved = max(float(t.abs().max()) for k, t in ddp.items() if "lora_B" in k)  # B starts at 0
        assert moved > 1e-3, name
        assert _max_diff(ddp, one4) < 1e-4 * moved, (name, _max_diff(ddp, one4))  # rounding only (seen: 1e-9)
        assert _max_diff(ddp, one2) > 0.05 * moved, name  # control: other rows per step


def test_distributed_flag_without_a_launcher_is_refused(tiny_chat, tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    data = _data(tmp_path)
    assert main(_args(tiny_chat, data, tmp_path / "out", 2) + ["--distributed", "ddp"]) == 2
    assert "torchrun --nproc-per-node N -m corept train" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _launched(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")


def test_fsdp_rules(monkeypatch):
    from corept.training import distributed

    _launched(monkeypatch)
    base = dict(method="sft", distributed="fsdp", save_method="lora")
    with pytest.raises(InvalidOptionsError, match="needs CUDA GPUs"):
        distributed.validate(h.options(**base), cuda=False)
    distributed.validate(h.options(**base), cuda=True)
    with pytest.raises(InvalidOptionsError, match="saves the LoRA adapter only"):
        distributed.validate(h.options(**dict(base, save_method="merged_16bit")), cuda=True)
    with pytest.raises(InvalidOptionsError, match="LLM.int8"):
        distributed.validate(h.options(**dict(base, load_in_8bit=True)), cuda=True)
    with pytest.raises(InvalidOptionsError, match="sft only"):
        distributed.validate(h.options("dpo", "full", distributed="fsdp", save_method="merged_16bit"), cuda=True)
    assert distributed.load_kwargs(h.options(**base)) == {"device_map": {"": "cpu"}, "compile": False}
    assert distributed.load_kwargs(h.options(**dict(base, load_in_4bit=True))) == {"bnb_4bit_quant_storage": "auto",
                                                                                    "compile": False}


def test_trainer_kwargs(tiny_chat, monkeypatch):
    import corept
    from corept.training import distributed

    model, _ = corept.load(tiny_chat)
    assert distributed.trainer_kwargs(h.options("sft"), model) == {"ddp_find_unused_parameters": False}
    _launched(monkeypatch)
    kw = distributed.trainer_kwargs(h.options("sft", distributed="fsdp"), model)
    assert kw["fsdp"] in (True, "full_shard") and kw["ddp_find_unused_parameters"] is False
    assert distributed.mode_of(h.options("sft")) == "ddp"  # launched with 2 processes: DDP by default
    from trl import SFTConfig

    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var)
    args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", **kw)  # transformers accepts them
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == type(model.model.layers[0]).__name__
    assert kw["fsdp_config"]["version"] == 2
    assert kw["fsdp_config"]["transformer_layer_cls_to_wrap"] == [type(model.model.layers[0]).__name__]
