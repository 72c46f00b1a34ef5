"""``corept export``: a saved folder or a trained adapter to one GGUF file; bad input is refused early."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import corept
import tiny
from corept.cli import main


def test_exports_a_folder_and_an_adapter(tmp_path, capsys):
    folder = tiny.save_tiny(tmp_path / "my-model", "llama")
    assert main(["export", str(folder), "-q", "q8_0", "--output", str(tmp_path / "g1")]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "g1" / "my-model-Q8_0.gguf"
    assert f"GGUF (q8_0): {path}" in out and "llama-cli -m" in out and "ollama create" in out
    AutoModelForCausalLM.from_pretrained(tmp_path / "g1", gguf_file=path.name)

    model, tok = corept.load(str(folder), patch=False)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    corept.save(peft_model, tok, tmp_path / "run" / "adapter", method="lora")
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["export", str(tmp_path / "run" / "adapter"), "-q", "f16", "--output", str(tmp_path / "g2")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "g2", gguf_file="run-F16.gguf", dtype=torch.float32)
    merged = peft_model.merge_and_unload()
    ids = tiny.batch()[0]
    with torch.no_grad():
        want, got = merged(ids).logits, exported(ids).logits
    assert (got - want).abs().max() <= 0.01 * want.abs().max()  # the adapter is in the file (f16 rounding only)


def test_bad_quantization_is_refused_before_loading(tmp_path, capsys):
    assert main(["export", str(tmp_path / "does-not-exist"), "-q", "q4", "--output", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "GGUF quantization 'q4' unknown" in err and "q4_k_m" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("missing", ["base_model_name_or_path"])
def test_adapter_without_base_is_explained(tmp_path, capsys, missing):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["export", str(folder), "--output", str(tmp_path / "g")]) == 2
    assert missing in capsys.readouterr().err
