"""``corept train`` and ``corept demo`` end to end (tiny built-in model: COREPT_DEMO_MODEL=tiny)."""
import hashlib
import json
from pathlib import Path

import importlib_metadata
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import training_helpers as h

from corept.cli import main


def _record(folder):
    return json.loads((folder / "run.json").read_text())


def test_no_arguments_runs_the_embedded_default(corept_cache, capsys):
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    run = corept_cache / "runs" / "demo-sft"
    rec = _record(run)
    for needle in ("a tiny random llama model built in", "held-out question: Which pip package adds Qwen support to corept?",
                   "before training:", "after training:", "loss: first", f"adapter (LoRA, safetensors): {run}/adapter",
                   f"merged model (merged_16bit, loads in plain transformers): {run}/merged",
                   "generate() patched vs unpatched (greedy, ", "): identical", "corept kernels: "):
        assert needle in out, needle
    assert rec["options"]["method"] == "sft" and rec["options"]["embedded"] is True
    assert rec["loss"]["last"] < rec["loss"]["first"], rec["loss"]
    assert rec["greedy_patched_equals_unpatched"] is True
    assert {"norm", "mlp", "rope", "lora"} <= set(rec["applied"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "merged" / "config.json").is_file()
    shown = "[ended with EOS after " if rec["after_stopped"] == "eos" else "[cut off at 96 tokens (--max-new-tokens)"
    assert rec["after_stopped"] in ("eos", "length") and shown in out, out
    data = rec["data"]  # the shipped file's install path may vanish: the package version and hash identify it
    assert data["shipped"] == f"corept {importlib_metadata.version('corept')} package data: corept/data/corept_sft.jsonl"
    assert data["sha256"] == hashlib.sha256(Path(data["path"]).read_bytes()).hexdigest()


def test_a_cut_off_answer_is_shown_to_its_last_sentence():
    from corept.training.generation import GreedyCheck, ending, last_sentence_end

    assert ending([5, 6, 2], {2}, 3) == "eos" and ending([5, 6, 7], {2}, 3) == "length"
    assert ending([5, 6], {2}, 3) == "eos"  # stopped early: generate() ended on a stop id it was given
    assert last_sentence_end("One. Two! Three and") == "One. Two!" and last_sentence_end("no end") == "no end"
    cut = GreedyCheck(True, [1] * 8, [1] * 8, "It is corept-qwen. It also", stopped="length")
    assert cut.shown() == ("It is corept-qwen.   [cut off at 8 tokens (--max-new-tokens); shown to its last full "
                           "sentence]")


def test_demo_kto_is_one_flag_away(corept_cache, tmp_path, capsys, caplog):
    assert main(["demo", "--method", "kto", "--max-steps", "3", "--output", str(tmp_path / "kto")]) == 0
    out = capsys.readouterr().out
    assert "unpaired preference format) -> method kto" in out and "before training:" in out
    assert "ideal range" not in caplog.text  # desirable/undesirable weights balanced for the 46/23 labels
    rec = _record(tmp_path / "kto")
    assert rec["options"]["max_steps"] == 3 and rec["greedy_patched_equals_unpatched"] is True
    assert len(rec["loss"]["points"]) == 3


def test_dpo_from_csv_saves_adapter_only(tiny_chat, tmp_path, capsys):
    data = tmp_path / "prefs.csv"
    data.write_text("prompt,chosen,rejected\n" + f"{h.Q},{h.A},{h.BAD.replace(',', '')}\n" * 6)
    out = tmp_path / "out"
    rc = main(["train", "--model", tiny_chat, "--data", str(data), "--method", "dpo", "--output", str(out),
               "--max-steps", "3", "--batch-size", "2", "--save-method", "lora", "--lr", "1e-2", "--r", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sample prompt: What is corept?" in text and "merged model" not in text
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "run.json"]
    assert not (out / "adapter" / "ref").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4


def test_full_finetuning_from_parquet(tiny_chat, tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": f"{h.Q} {h.A}"}] * 8), tmp_path / "d.parquet")
    out = tmp_path / "out"
    assert main(["train", "--model", tiny_chat, "--data", str(tmp_path / "d.parquet"), "--output", str(out),
                 "--full-finetuning", "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3"]) == 0
    rec = _record(out)
    assert rec["adapter"] is None and (out / "merged" / "model.safetensors").is_file()
    assert rec["loss"]["last"] < rec["loss"]["first"]
    assert "lora" not in rec["applied"] and {"norm", "mlp", "rope", "loss"} <= set(rec["applied"])


def test_qlora_kto_from_jsonl(tiny_chat, tmp_path):
    data = h.write_jsonl(tmp_path / "kto.jsonl", h.rows("kto", 8))
    out = tmp_path / "out"
    assert main(["train", "--model", tiny_chat, "--data", str(data), "--method", "kto", "--output", str(out),
                 "--load-in-4bit", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--save-gguf", "Q8_0"]) == 0
    rec = _record(out)
    assert rec["options"]["load_in_4bit"] is True and rec["greedy_patched_equals_unpatched"] is True
    merged_cfg = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg  # merged_16bit from a 4-bit base is a plain folder
    # the GGUF file holds the same merged weights, Q8_0-quantized
    from transformers import AutoModelForCausalLM

    from corept.export.gguf.names import from_file, to_file
    from corept.export.gguf.quants import quantize_q8_0
    from corept.export.gguf.readback import read_back
    from corept.export.gguf.writer import prepare

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    state, types = read_back(rec["gguf"], merged)
    plans = {p.hf: p for p in prepare(merged, None, "q8_0").plans}
    weights = merged.state_dict()
    for key, got in state.items():
        if types[key] == "Q8_0":
            laid = to_file(plans[key], weights[key].float())
            assert torch.equal(got, from_file(plans[key], quantize_q8_0(laid)[1])), key
