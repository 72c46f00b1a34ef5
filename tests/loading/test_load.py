"""corept.load: plugin selection from the config, dtype/attention quirks, quantization, tokenizer,
hub-cache and alias names offline, and option validation before anything is resolved or loaded."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import corept
import tiny

IDS, LABELS = tiny.batch()
NOWHERE = "no-such-org/no-such-model-anywhere"


def _hf(folder, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def _check_tokenizer(tok, max_seq_length):
    reference = tiny.tiny_tokenizer()
    text = "The quick brown fox, Paris! xyzzy 123"
    assert tok(text).input_ids == reference(text).input_ids
    assert tok.decode(tok(text).input_ids) == reference.decode(reference(text).input_ids)
    assert len(tok) == len(reference)  # no token was added to the vocabulary
    assert tok.pad_token is not None and tok.pad_token == tok.eos_token == "</s>"
    assert tok.model_max_length == max_seq_length
    padded = tok(["Hello world", "The quick brown fox jumps"], padding=True, return_tensors="pt")
    assert padded.input_ids.shape[0] == 2 and (padded.input_ids[0] == tok.pad_token_id).any()


@pytest.mark.parametrize("model_type", tiny.ARCHS)
def test_load_selects_the_plugin(tiny_folders, model_type):
    folder = tiny_folders[model_type]
    model, tok = corept.load(str(folder), max_seq_length=64)
    r = corept.report(model)
    assert (r.plugin, r.model_type) == (tiny.PLUGIN_OF[model_type], model_type)
    assert {"norm", "rope", "loss"} <= set(r.applied) and "mlp" in r.applied
    assert model.dtype == torch.float32  # auto on CPU
    assert model.max_seq_length == 64
    ref = _hf(folder)
    want = ref.state_dict()
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    _check_tokenizer(tok, 64)


def test_load_attention_quirks(tiny_folders):
    """gemma2 declares eager; gemma3_text disables SDPA; the others keep transformers' default."""
    impl = {}
    for mt in ("llama", "gemma2", "gemma3_text"):
        model, _ = corept.load(str(tiny_folders[mt]), max_seq_length=64)
        impl[mt] = model.config._attn_implementation
    assert impl == {"llama": _hf(tiny_folders["llama"]).config._attn_implementation, "gemma2": "eager",
                    "gemma3_text": "eager"}
    assert impl["llama"] == "sdpa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp16", "float16", "bf16"])
def test_load_16bit(tiny_folders, dtype):
    folder = tiny_folders["llama"]
    model, _ = corept.load(str(folder), dtype=dtype, max_seq_length=64)
    want = torch.bfloat16 if dtype in (torch.bfloat16, "bf16") else torch.float16
    assert model.dtype == want and {p.dtype for p in model.parameters()} == {want}
    assert corept.report(model).plugin == "llama" and set(corept.report(model).applied) == {"norm", "mlp", "rope", "loss",
                                                                                            "attention"}
    if isinstance(dtype, str) and dtype != "fp16":
        return  # the other spellings only need to map to the same dtype
    # 16-bit is judged against an fp32 gold copy: corept's error at most 2x transformers' own
    with torch.no_grad():
        got = model(IDS).logits
        hf = _hf(folder, dtype=want)(IDS).logits
        gold = _hf(folder, dtype=torch.float32)(IDS).logits
    assert got.dtype == want and torch.isfinite(got).all()
    err, hf_err = (got.float() - gold).abs().max(), (hf.float() - gold).abs().max()
    assert 0 < hf_err and err <= 2 * hf_err, (err, hf_err)


def test_gemma3_forces_float32_instead_of_fp16(tiny_folders):
    model, _ = corept.load(str(tiny_folders["gemma3_text"]), dtype="fp16", max_seq_length=64)
    assert model.dtype == torch.float32 and {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "eager"
    # bf16 is not fp16: it is honoured (fp16 overflow is the quirk's reason)
    model, _ = corept.load(str(tiny_folders["gemma3_text"]), dtype=torch.bfloat16, max_seq_length=64)
    assert model.dtype == torch.bfloat16
    # and an architecture without the quirk gets the fp16 it asked for
    model, _ = corept.load(str(tiny_folders["gemma2"]), dtype="fp16", max_seq_length=64)
    assert model.dtype == torch.float16


def test_load_4bit(tiny_folders):
    import bitsandbytes as bnb

    folder = tiny_folders["llama"]
    model, tok = corept.load(str(folder), load_in_4bit=True, max_seq_length=64)
    linears = [m for n, m in model.named_modules() if n.endswith(tiny_lora_targets())]
    assert len(linears) == 14
    for m in linears:
        assert isinstance(m, bnb.nn.Linear4bit)
        assert m.weight.quant_type == "nf4" and m.weight.quant_state.nested  # double quantization
        assert m.support_avx512bf16_for_cpu is False
    assert type(model.lm_head) is torch.nn.Linear
    r = corept.report(model)
    assert r.plugin == "llama" and {"norm", "mlp", "rope", "loss"} <= set(r.applied)
    _check_tokenizer(tok, 64)

    plain, _ = corept.load(str(folder), load_in_4bit=True, max_seq_length=64, patch=False)
    assert not corept.is_patched(plain)
    # an eval forward first (where bitsandbytes would repack CPU weights), then training
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, rtol=1e-4, atol=1e-5)
    model.train()
    plain.train()
    loss, ref_loss = model(IDS, labels=LABELS).loss, plain(IDS, labels=LABELS).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    g, g_ref = model.model.embed_tokens.weight.grad, plain.model.embed_tokens.weight.grad
    assert g is not None and g.abs().sum() > 0, "no gradient reached the embeddings through the 4-bit layers"
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def tiny_lora_targets():
    return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_load_8bit(tiny_folders):
    import bitsandbytes as bnb

    model, _ = corept.load(str(tiny_folders["qwen3"]), load_in_8bit=True, max_seq_length=64)
    linears = [m for n, m in model.named_modules() if n.endswith(tiny_lora_targets())]
    assert len(linears) == 14 and all(isinstance(m, bnb.nn.Linear8bitLt) for m in linears)
    assert all(m.weight.dtype == torch.int8 for m in linears)
    r = corept.report(model)
    assert r.plugin == "qwen" and {"norm", "mlp", "rope", "loss"} <= set(r.applied)


def test_load_full_finetuning(tiny_folders):
    model, _ = corept.load(str(tiny_folders["mistral"]), full_finetuning=True, max_seq_length=64)
    assert model.corept_load_options.full_finetuning
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules() if "Linear" in type(m).__name__)
    assert all(p.requires_grad for p in model.parameters())
    assert corept.report(model).plugin == "mistral"


def test_load_without_patch(tiny_folders):
    model, tok = corept.load(str(tiny_folders["qwen2"]), patch=False, max_seq_length=64)
    assert not corept.is_patched(model) and tok is not None
    assert [n for n in tiny.instance_overrides(model) if not n.startswith("<root>")] == []


# -- names: HF cache, hub ids, aliases --------------------------------------------------------
def test_hub_id_from_the_hf_cache_offline(hub_cache):
    model, tok = corept.load("unsloth/Qwen3-8B", cache_dir=hub_cache, max_seq_length=64)
    r = corept.report(model)
    assert (r.plugin, r.model_type, type(model).__name__) == ("qwen", "qwen3", "Qwen3ForCausalLM")
    _check_tokenizer(tok, 64)
    snapshot = hub_cache / "models--unsloth--Qwen3-8B" / "snapshots" / ("1" * 40)
    want = _hf(snapshot).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_plugin_alias_resolves_through_the_cache(hub_cache):
    model, _ = corept.load("qwen3-8b", cache_dir=hub_cache, max_seq_length=64)
    assert corept.report(model).plugin == "qwen"
    snapshot = hub_cache / "models--Qwen--Qwen3-8B" / "snapshots" / ("2" * 40)  # the alias target, seed 4
    want = _hf(snapshot).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_dotted_alias_loads_from_the_cache(hub_cache):
    model, _ = corept.load("qwen2.5-7b", cache_dir=hub_cache, max_seq_length=64)
    r = corept.report(model)
    assert (r.plugin, r.model_type) == ("qwen", "qwen2")


def test_unknown_name_offline(hub_cache):
    with pytest.raises(corept.ModelNotFoundError, match="HF_HUB_OFFLINE"):
        corept.load(NOWHERE, cache_dir=hub_cache)


# -- unknown architecture ----------------------------------------------------------------------
def test_load_unknown_architecture_warns(tiny_folders, corept_warnings):
    model, tok = corept.load(str(tiny_folders["gpt2"]), max_seq_length=64)
    assert type(model).__name__ == "GPT2LMHeadModel" and tok is not None
    assert "no corept plugin supports model_type 'gpt2'" in corept_warnings.text
    assert corept.report(model).plugin is None and not corept.report(model).applied
    assert [n for n in tiny.instance_overrides(model) if not n.startswith("<root>")] == []
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, _hf(tiny_folders["gpt2"])(IDS).logits)


def test_load_unknown_architecture_strict(tiny_folders):
    with pytest.raises(corept.UnsupportedArchitectureError) as info:
        corept.load(str(tiny_folders["gpt2"]), strict=True)
    msg = str(info.value)
    assert "'gpt2'" in msg and "Installed plugins: " in msg and "pip install corept-" in msg
    assert all(name in msg for name in ("llama", "mistral", "qwen", "gemma"))


# -- contradictory options, rejected before the name is even looked at ---------------------------
BAD_OPTIONS = [  # (options, what the message must say)
    (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit are exclusive"),
    (dict(load_in_4bit=True, full_finetuning=True), "full_finetuning"),
    (dict(load_in_8bit=True, full_finetuning=True), "full_finetuning"),
    (dict(load_in_4bit=True, load_in_8bit=True, full_finetuning=True), "exclusive"),
    (dict(max_seq_length=0), "max_seq_length must be a positive int, got 0"),
    (dict(max_seq_length=-1), "got -1"),
    (dict(max_seq_length="2048"), "got '2048'"),
    (dict(max_seq_length=2048.0), "got 2048.0"),
    (dict(max_seq_length=True), "got True"),
    (dict(max_seq_length=None), "got None"),
    (dict(dtype="float8"), "dtype 'float8' is not understood"),
    (dict(dtype="int4"), "dtype 'int4' is not understood"),
    (dict(dtype=torch.int8), "torch.int8 is not supported"),
    (dict(dtype=torch.float64), "torch.float64 is not supported"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_OPTIONS])
def test_contradictory_options_fail_before_resolution(options, message):
    with pytest.raises(corept.InvalidOptionsError) as info:
        corept.load(NOWHERE, **options)
    assert not isinstance(info.value, corept.ModelNotFoundError)
    assert message in str(info.value)


def test_the_same_name_is_a_not_found_error_with_valid_options():
    """Proves the tests above fail on the options, not on the missing model."""
    with pytest.raises(corept.ModelNotFoundError):
        corept.load(NOWHERE, dtype="bf16", load_in_4bit=True)
