"""Saving what TRL trained: merged folders and adapters load without corept, and saves are atomic.

The loading side runs in a subprocess whose ``sys.path`` has no corept (``-P``, no PYTHONPATH, the
venv holds third-party packages only): it proves the folder is plain transformers / peft.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import training_helpers as h

import corept
from corept.training.compat import trl_head_scope
from corept.training.trainers import build_trainer

PLAIN_LOAD = textwrap.dedent("""
    import importlib.util, json, sys, torch
    assert importlib.util.find_spec("corept") is None, "corept must not be importable here"
    from transformers import AutoModelForCausalLM
    folder, base, ids_json, out = sys.argv[1:5]
    ids = torch.tensor(json.loads(ids_json))
    if base == "-":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
    with torch.no_grad():
        torch.save(model.eval()(input_ids=ids).logits, out)
""")


def plain_logits(folder, ids, tmp_path, env, base="-"):
    out = tmp_path / f"logits-{abs(hash((str(folder), base)))}.pt"
    subprocess.run([sys.executable, "-P", "-c", PLAIN_LOAD, str(folder), str(base), json.dumps(ids.tolist()),
                    str(out)], check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return torch.load(out)


def _ids(vocab):
    return torch.randint(4, vocab, (2, 10), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trained_lora_roundtrip_without_corept(tiny_chat, tmp_path, clean_env):
    model, tok = h.load(tiny_chat, "lora")
    with trl_head_scope(model):
        build_trainer("sft", model, tok, h.dataset("sft"), h.options("sft", max_steps=3)).train()
    assert any(p.any() for n, p in model.named_parameters() if "lora_B" in n)  # the adapters moved
    ids = _ids(model.config.vocab_size)
    expected = _logits(model, ids)
    adapter = corept.save(model, tok, tmp_path / "adapter", method="lora")
    merged = corept.save(model, tok, tmp_path / "merged", method="merged_16bit")
    assert not list(merged.glob("*.bin")) and list(merged.glob("*.safetensors"))
    torch.testing.assert_close(plain_logits(merged, ids, tmp_path, clean_env), expected)
    torch.testing.assert_close(plain_logits(adapter, ids, tmp_path, clean_env, base=tiny_chat), expected)


def test_qlora_merged_16bit_roundtrip_without_corept(tiny_chat, tmp_path, clean_env):
    """A 4-bit base is dequantized and merged in fp32: the plain fp32 folder reproduces the QLoRA model."""
    model, tok = h.load(tiny_chat, "qlora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = _ids(model.config.vocab_size)
    expected = _logits(model, ids)
    merged = corept.save(model, tok, tmp_path / "merged", method="merged_16bit")
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg
    torch.testing.assert_close(plain_logits(merged, ids, tmp_path, clean_env), expected)


@pytest.fixture(scope="module")
def tiny_moe_chat(tmp_path_factory):
    """A tiny qwen3_moe chat model (4 experts, top-2) with the shipped data's tokenizer."""
    from corept.tiny import save_tiny, tiny_model, tiny_tokenizer
    from corept.training import defaults as D

    tok = tiny_tokenizer(D._corpus())
    tok.chat_template = D.TINY_CHAT_TEMPLATE
    model = tiny_model("qwen3_moe", head_dim=32, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=len(tok),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    return str(save_tiny(model, tok, tmp_path_factory.mktemp("tiny-moe")))


def test_trained_experts_lora_roundtrip_without_corept(tiny_moe_chat, tmp_path, clean_env):
    """LoRA on the stacked experts (peft's target_parameters) trains through TRL, and the adapter
    folder and the merged folder both reproduce the trained model in plain peft / transformers."""
    model, tok = h.load(tiny_moe_chat, "lora")
    with trl_head_scope(model):
        build_trainer("sft", model, tok, h.dataset("sft"), h.options("sft", max_steps=3)).train()
    assert any(p.any() for n, p in model.named_parameters() if "experts" in n and "lora_B" in n)
    ids = _ids(model.config.vocab_size)
    expected = _logits(model, ids)
    adapter = corept.save(model, tok, tmp_path / "adapter", method="lora")
    merged = corept.save(model, tok, tmp_path / "merged", method="merged_16bit")
    torch.testing.assert_close(plain_logits(merged, ids, tmp_path, clean_env), expected)
    torch.testing.assert_close(plain_logits(adapter, ids, tmp_path, clean_env, base=tiny_moe_chat), expected)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_interrupted_save_keeps_previous(tiny_chat, tmp_path, monkeypatch):
    model, tok = h.load(tiny_chat, "lora")
    target = tmp_path / "merged"
    corept.save(model, tok, target, method="merged_16bit")
    previous = _snapshot(target)
    real_save = safetensors.torch.save_file
    written = []

    def dies_mid_write(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:2]), filename, metadata=metadata)  # a partial shard lands on disk
        written.append(filename)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_mid_write)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # the new save would differ
    with pytest.raises(OSError, match="injected"):
        corept.save(model, tok, target, method="merged_16bit")
    assert written and str(written[0]).startswith(str(target / ".corept-staging-"))  # a hidden staging folder
    assert _snapshot(target) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folder left behind
    with pytest.raises(OSError, match="injected"):
        corept.save(model, tok, tmp_path / "fresh", method="merged_16bit")
    assert not (tmp_path / "fresh").exists()


def test_8bit_merge_after_training(tiny_chat, tmp_path):
    """LLM.int8 base, adapters on q/v only, trained by TRL (bitsandbytes moves the row scales to the
    module after a forward): the merged folder holds every weight, dequantized, adapters merged."""
    from safetensors.torch import load_file

    model, tok = corept.load(tiny_chat, load_in_8bit=True)
    model = corept.get_peft_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                  use_gradient_checkpointing=False)
    with trl_head_scope(model):
        build_trainer("sft", model, tok, h.dataset("sft"), h.options("sft", max_steps=2, load_in_8bit=True,
                                                                    load_in_4bit=False)).train()
    merged = load_file(corept.save(model, tok, tmp_path / "merged", method="merged_16bit") / "model.safetensors")
    plain, _ = corept.load(tiny_chat, patch=False)
    original = plain.state_dict()
    assert set(merged) == set(original)
    # bitsandbytes rounds each row to int8 steps of absmax/127 (from an fp16 copy: allow one full step)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):  # no adapter
        step = original[name].abs().amax(dim=1, keepdim=True) / 127
        assert ((merged[name] - original[name]).abs() <= step).all(), name
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = q.scaling["default"] * (q.lora_B["default"].weight.float() @ q.lora_A["default"].weight.float())
    assert delta.abs().max() > 0
    name = "model.layers.0.self_attn.q_proj.weight"
    step = original[name].abs().amax(dim=1, keepdim=True) / 127
    assert ((merged[name] - delta - original[name]).abs() <= step).all()
