"""4-bit MoE loads keep the 16-bit experts off the GPU (corept.loading.experts_onload).

On CPU, accelerate offloads to disk what a GPU load offloads to the CPU: the same hooks with the
weights on the meta device, so :func:`onload_experts` is exercised on the same structure; the GPU
load itself (peak memory) is the CUDA test at the end.
"""
import copy

import pytest
import torch
from accelerate import dispatch_model

import corept
from corept import tiny
from corept.components import experts_4bit as q4
from corept.loading.experts_onload import experts_device_map, onload_experts

CONFIGS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
}
CLASSES = {"qwen3_moe": ("Qwen3MoeExperts",), "gpt_oss": ("GptOssExperts",)}
IDS = torch.randint(0, tiny.TINY_SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def _model(model_type):
    model = tiny.tiny_model(model_type, **CONFIGS[model_type])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_device_map_puts_experts_on_the_cpu_and_covers_every_tensor_once(model_type):
    with torch.device("meta"):
        meta = _model(model_type)
    dm = experts_device_map(meta, CLASSES[model_type], "cuda:0")
    assert "" not in dm
    experts = {n for n, m in meta.named_modules() if type(m).__name__ in CLASSES[model_type]}
    assert experts and {k for k, v in dm.items() if v == "cpu"} == experts
    assert set(dm.values()) == {"cpu", "cuda:0"}
    names = [n for n, _ in meta.named_parameters(remove_duplicate=False)] + [n for n, _ in meta.named_buffers()]
    for name in names:
        owners = [k for k in dm if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)
    assert experts_device_map(tiny.tiny_model("llama"), CLASSES[model_type], "cuda:0") is None


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_offloaded_experts_come_back_quantized_one_module_at_a_time(model_type, tmp_path):
    model = _model(model_type)
    want = copy.deepcopy(model)
    q4.quantize_experts([m for m in want.modules() if type(m).__name__ in CLASSES[model_type]])
    dm = {k: ("disk" if v == "cpu" else "cpu") for k, v in experts_device_map(model, CLASSES[model_type], "x").items()}
    dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    experts = [m for m in model.modules() if type(m).__name__ in CLASSES[model_type]]
    assert all(m.gate_up_proj.device.type == "meta" for m in experts)  # what a GPU load leaves on the CPU
    assert onload_experts(model, CLASSES[model_type], "cpu", quantize=True) == len(experts)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert all(q4.is_4bit(getattr(m, n)) for m in experts for n in q4.WEIGHTS)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for (name, got), (_, ref) in zip(model.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(got, ref), name  # packed NF4 data and quant states included
    with torch.no_grad():  # only corept's experts forward reads NF4 stacked weights
        torch.testing.assert_close(corept.patch(model)(IDS).logits, corept.patch(want)(IDS).logits, rtol=0, atol=0)


def test_experts_the_patch_keeps_go_back_to_16_bits(tmp_path, caplog):
    """Quantized while loading, but served by transformers' forward (patch(only=...)): dequantized."""
    model = _model("gpt_oss")
    dm = {k: ("disk" if v == "cpu" else "cpu") for k, v in experts_device_map(model, CLASSES["gpt_oss"], "x").items()}
    dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    onload_experts(model, CLASSES["gpt_oss"], "cpu", quantize=True)
    corept.patch(model, only=["norm"])
    assert q4.quantize_patched_experts(model) == 0
    experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
    assert experts and not any(q4.is_4bit(getattr(m, n)) for m in experts for n in q4.WEIGHTS)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: GPU memory during a 4-bit load")
def test_4bit_moe_load_never_holds_the_16bit_experts_on_the_gpu(tmp_path):
    """A MoE model whose 16-bit experts are most of its weights (8 layers: one layer's are an
    eighth): the load's GPU peak above the loaded 4-bit model stays below a third of the 16-bit
    experts (loading them all in 16 bits first would put ~3/4 of them above it), every stacked
    weight ends in NF4, and the model trains (one LoRA step) as an ordinary single-GPU model."""
    sizes = dict(hidden_size=512, intermediate_size=1024, num_local_experts=16, num_experts_per_tok=2,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = tiny.tiny_model("gpt_oss", **sizes).to(torch.bfloat16)
    experts_bytes = sum(getattr(m, n).numel() * 2 for m in model.modules() if type(m).__name__ == "GptOssExperts"
                        for n in q4.WEIGHTS)
    folder = tiny.save_tiny(model, tiny.tiny_tokenizer(["a b c"]), tmp_path / "moe")
    del model
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded, _ = corept.load(str(folder), load_in_4bit=True, max_seq_length=64)
    peak, after = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    experts = [m for m in loaded.modules() if type(m).__name__ == "GptOssExperts"]
    state = dict(peak=peak, after=after, experts_bytes=experts_bytes,
                 nf4=[q4.is_4bit(getattr(m, n)) for m in experts for n in q4.WEIGHTS],
                 report=corept.report(loaded).to_dict())
    assert experts and all(state["nf4"]), state
    assert peak - after < experts_bytes / 3, state
    assert loaded.hf_device_map == {"": torch.cuda.current_device()}
    assert not any(hasattr(m, "_hf_hook") for m in loaded.modules())
    assert "experts_4bit" in corept.report(loaded).settings
    peft_model = corept.get_peft_model(loaded, r=4, lora_alpha=8)
    ids = IDS.cuda()
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
