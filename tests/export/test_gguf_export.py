"""GGUF export end to end on tiny models: transformers' own GGUF loader reads what corept wrote, the
K-quant mixes follow their rule and beat the plain inverse per tensor, LoRA and QLoRA are merged in
fp32, tokenizers survive, and every refusal comes before any work.

transformers' GGUF loader is the independent reader here for llama, mistral, qwen2, qwen3, gemma2 and
gemma3 text. Its tensor-name lookup asks the ``gguf`` table for the model's own ``model_type``, which
has no ``mistral`` (llama.cpp writes Mistral as ``llama``), so a Mistral file is read into the
equivalent Llama model. It has no ``gemma`` (Gemma 1) architecture at all: Gemma 1 is read back through
corept's declaration-driven reader (``read_back``), as every architecture is by the conformance kit.
"""
import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import corept
import tiny
from corept.errors import InvalidOptionsError, UnsupportedArchitectureError
from corept.export.gguf.mix import tensor_type
from corept.export.gguf.names import from_file, to_file
from corept.export.gguf.quants import QUANTIZERS
from corept.export.gguf.readback import read_back
from corept.export.gguf.writer import prepare
from corept.saving.merge import merged_state_dict
from gguf_helpers import byte_fallback_tokenizer, plain_inverse

HF_READS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
TIED = ("gemma", "gemma2", "gemma3_text")  # llama.cpp reads their head from the embedding, as the real models tie


def _model(model_type, **overrides):
    if model_type in TIED:
        overrides.setdefault("tie_word_embeddings", True)
    model = tiny.tiny_model(model_type, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("model_type", HF_READS)
def test_transformers_gguf_loader_reads_back_the_same_weights(model_type, tmp_path):
    model = _model(model_type)
    path = corept.save(model, None, tmp_path, method="gguf", quantization="q8_0")
    ours, _ = read_back(path, model)
    reader_model = tiny.tiny_model("llama") if model_type == "mistral" else model  # same shapes and names
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reader_model)["tensors"]
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert torch.equal(torch.as_tensor(theirs[key]).float(), value), key
    reloaded = tiny.tiny_model(model_type, **({"tie_word_embeddings": True} if model_type in TIED else {}))
    reloaded.load_state_dict(ours, strict=False)
    ids = tiny.batch()[0]
    with torch.no_grad():
        want, got = model(ids).logits, reloaded.eval()(ids).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # Q8_0's own error, stated in docs/export.md


@pytest.mark.parametrize("model_type", tiny.ARCHS)
@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_mixes_follow_the_rule_and_beat_the_plain_inverse(model_type, mix, tmp_path):
    model = _model(model_type, hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=300)
    path = corept.save(model, None, tmp_path, method="gguf", quantization=mix)
    state, types = read_back(path, model)
    plans = {p.hf: p for p in prepare(model, None, mix).plans}
    tied = "lm_head.weight" not in plans
    weights = model.state_dict()
    kinds = set()
    for key, got in state.items():
        plan = plans[key]
        laid_out = to_file(plan, weights[key].float())
        layers = model.config.num_hidden_layers
        assert types[key] == tensor_type(mix, plan.gguf, tuple(laid_out.shape), layers, tied).name, key
        name = types[key].lower()
        if name in ("q4_k", "q5_k", "q6_k"):
            kinds.add(name)
            ours = QUANTIZERS[name](laid_out)[1]
            assert torch.equal(got, from_file(plan, ours)), key
            err = (ours - laid_out).pow(2).mean()
            assert err <= (plain_inverse(name, laid_out) - laid_out).pow(2).mean(), key
    assert "q6_k" in kinds and (mix == "q6_k" or len(kinds) == 2)


def _adapted(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def test_lora_is_merged_in_fp32_before_writing(tmp_path):
    model = _adapted(_model("qwen3"))
    merged = merged_state_dict(model, torch.float32)
    path = corept.save(model, None, tmp_path, method="gguf", quantization="f16")
    state, types = read_back(path, model.get_base_model())
    plans = {p.hf: p for p in prepare(model, None, "f16").plans}
    for key, got in state.items():
        stored = to_file(plans[key], merged[key])
        expected = from_file(plans[key], stored.half().float() if types[key] == "F16" else stored)
        assert torch.equal(got, expected), key


def test_qlora_base_is_dequantized_and_merged(tmp_path):
    folder = tiny.save_tiny(tmp_path / "base", "llama")
    base, tok = corept.load(str(folder), load_in_4bit=True, dtype=torch.float32)
    model = _adapted(base)
    merged = merged_state_dict(model, torch.float32)
    path = corept.save(model, tok, tmp_path / "gguf", method="gguf", quantization="bf16")
    plain = tiny.tiny_model("llama")
    state, types = read_back(path, plain)
    plans = {p.hf: p for p in prepare(plain, None, "bf16").plans}
    assert {types[k] for k in state} == {"BF16", "F32"}
    for key, got in state.items():
        stored = to_file(plans[key], merged[key])
        expected = from_file(plans[key], stored.bfloat16().float() if types[key] == "BF16" else stored)
        assert torch.equal(got, expected), key


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_round_trips_through_transformers(kind, tmp_path):
    from corept.tiny import tiny_tokenizer

    tok = tiny_tokenizer(tiny.TEXTS) if kind == "gpt2" else byte_fallback_tokenizer(tiny.TEXTS)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    model = _model("llama", vocab_size=len(tok) + 3)  # rows beyond the tokenizer become unused tokens
    path = corept.save(model, tok, tmp_path, method="gguf", quantization="f16")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == kind
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == len(tok) + 3 and types[-1] == gguf.TokenType.UNUSED
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in tiny.TEXTS + ["naïve café 😀 x=1;\nnew line"]:
        assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids, text
    assert loaded.chat_template == tok.chat_template
    assert loaded.eos_token_id == tok.eos_token_id and loaded.bos_token_id == tok.bos_token_id


def _refused(tmp_path, exc, match, model, tok=None, **kw):
    target = tmp_path / "out"
    with pytest.raises(exc, match=match):
        corept.save(model, tok, target, method="gguf", **kw)
    assert not target.exists(), "a refused export wrote something"


def test_refusals_come_before_any_work(tmp_path):
    model = _model("llama")
    _refused(tmp_path, InvalidOptionsError, "q4_k_m", model, quantization="q4_km")
    _refused(tmp_path, UnsupportedArchitectureError, "declares no GGUF mapping", _model("qwen3_moe"))
    rope = _model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    _refused(tmp_path, InvalidOptionsError, "RoPE type 'dynamic'", rope)
    from corept.tiny import tiny_tokenizer

    _refused(tmp_path, InvalidOptionsError, "resize the embeddings", _model("llama", vocab_size=40),
             tiny_tokenizer(tiny.TEXTS))
    with pytest.raises(InvalidOptionsError, match="method='gguf'"):
        corept.save(model, None, tmp_path / "x", method="merged_16bit", quantization="q8_0")


def test_unnamed_tensors_are_listed_with_the_fix(tmp_path):
    from corept import Architecture, ArchitecturePlugin, GGUFExport, ModuleRoles

    arch = Architecture(model_type="llama", roles=ModuleRoles.standard("Llama"), priority=99,
                        gguf=GGUFExport(arch="not-in-gguf", tensors={"model.embed_tokens": "token_embd"}))
    corept.register_plugin(ArchitecturePlugin([arch]), "gguf-test")
    try:
        _refused(tmp_path, InvalidOptionsError, r"no GGUF name for model\.layers\.0\..*GGUFExport\(tensors=",
                 _model("llama"))
    finally:
        corept.unregister_plugin("gguf-test")


def test_interrupted_export_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _model("llama")
    first = corept.save(model, None, tmp_path, method="gguf", quantization="f16")
    before = first.read_bytes()

    write = gguf.GGUFWriter.write_tensor_data
    calls = []

    def dies_midway(self, *a, **k):  # the header and four tensors are on disk when the fifth fails
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        corept.save(model, None, tmp_path, method="gguf", quantization="q8_0")
    monkeypatch.undo()
    assert first.read_bytes() == before and not (tmp_path / first.name.replace("F16", "Q8_0")).exists()
    second = corept.save(model, None, tmp_path, method="gguf", quantization="q8_0")
    assert second.is_file() and not first.exists()  # the new set replaces corept's previous file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([second.name, "corept_save.json"])
    AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=second.name)  # a whole, readable file
