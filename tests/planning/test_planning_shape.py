"""Parameter counts from the meta-device model against real models: dense, LoRA (peft) and NF4."""
import json
import math

import pytest
import torch
from planning_helpers import build, tiny_config

from corept.planning import PlanError, model_shape
from corept.planning.estimate import NF4_TENSOR_OVERHEAD, weight_bytes
from corept.planning.known import known_config, known_configs


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", False),
                                             ("qwen3", False), ("gemma2", True), ("gpt2", False)])
def test_param_count_equals_instantiated_model(model_type, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=257, n_positions=128)
    else:
        config = tiny_config(model_type, tie_word_embeddings=tied)
    real = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.n_params == sum(p.numel() for p in real.parameters())
    assert shape.tied == tied or model_type == "gpt2"
    assert shape.layers == 2 and shape.hidden == 64


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma"])
@pytest.mark.parametrize("r", [4, 8])
def test_lora_params_equal_peft_trainable(model_type, r):
    config = tiny_config(model_type)
    model = build(config, "lora", r=r, dtype=torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_shape(config).lora_params(r) == trainable


def test_lora_params_without_plugin_use_peft_all_linear():
    """phi3 has no corept plugin: peft's all-linear (every Linear but lm_head) is what trains."""
    import peft
    from transformers import AutoModelForCausalLM

    from transformers import AutoConfig

    config = AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
                                  pad_token_id=None, eos_token_id=2, bos_token_id=1)
    shape = model_shape(config)
    assert shape.plugin is None and not shape.patched and shape.notes
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(config), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_nf4_weight_bytes_match_a_real_4bit_load(tmp_path):
    """bitsandbytes NF4 + double quant on CPU: packed n/2, absmax n/64, fp32 second-level absmax per
    256 blocks, plus code tables (1024 + 64 B) and an fp32 offset per tensor; the planner rounds
    those to NF4_TENSOR_OVERHEAD (the CUDA allocator's 512-byte blocks)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = tiny_config("llama", hidden_size=256, intermediate_size=640, head_dim=64, vocab_size=1000)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
                                             quantization_config=BitsAndBytesConfig(
                                                 load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    seen, total, n_quant, n_tensors = set(), 0, 0, 0
    for t in list(q.parameters()) + list(q.buffers()):
        tensors = [t]
        state = getattr(t, "quant_state", None)
        if state is not None:
            n_tensors += 1
            n_quant += math.prod(state.shape)
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        for x in tensors:
            if x.untyped_storage().data_ptr() not in seen:
                seen.add(x.untyped_storage().data_ptr())
                total += x.untyped_storage().nbytes()
    shape = model_shape(config)
    buffers = sum(b.numel() * b.element_size() for b in q.buffers())
    assert (shape.n_quantized, shape.n_quant_tensors) == (n_quant, n_tensors)
    assert weight_bytes(shape, "qlora", 2) + buffers - total == n_tensors * (NF4_TENSOR_OVERHEAD - 1024 - 64 - 4)
    assert weight_bytes(shape, "lora", 2) == 2 * shape.n_params


def test_config_sources(tmp_path):
    config = tiny_config("llama")
    config.save_pretrained(tmp_path)
    by_folder = model_shape(str(tmp_path))
    by_file = model_shape(str(tmp_path / "config.json"))
    by_dict = model_shape(config.to_dict())
    assert by_folder.n_params == by_file.n_params == by_dict.n_params == model_shape(config).n_params
    assert "local folder" in by_folder.source


def test_built_in_configs_resolve_offline():
    name, d = known_config("unsloth/Llama-3.1-8B-Instruct-bnb-4bit")
    assert name == "meta-llama/Llama-3.1-8B" and d["hidden_size"] == 4096
    assert known_config("qwen3-8b")[0] == "Qwen/Qwen3-8B"
    assert known_config("not-a-model") is None
    assert model_shape("llama-3.1-8b").name == "meta-llama/Llama-3.1-8B"  # plugin alias -> built-in
    shape = model_shape("meta-llama/Llama-3.1-8B")
    assert "built-in" in shape.source and shape.plugin == "llama" and shape.patched
    assert round(shape.n_params / 1e9, 2) == 8.03 and shape.lora_params(16) == 41_943_040
    # the configs are the plugins' declarations (KnownModel.config), not a table in the core
    assert set(known_configs()) >= {"meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B"}
    assert known_configs()["Qwen/Qwen2.5-14B"]["model_type"] == "qwen2"


def test_unreadable_configs_raise_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="cannot read the config of 'no-such/model-xyz'"):
        model_shape("no-such/model-xyz")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(PlanError, match="cannot read the config"):
        model_shape(str(tmp_path))
    with pytest.raises(PlanError, match="model_type"):
        model_shape({"hidden_size": 64})
    with pytest.raises(PlanError, match="causal LM"):
        model_shape({"model_type": "t5", "d_model": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 100})
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(PlanError):
        model_shape(123)


@pytest.mark.parametrize("model_type,kw", [
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                       mlp_only_layers=[])),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
])
def test_moe_lora_params_equal_corept_peft_trainable(model_type, kw):
    """Mixture of experts: LoRA on attention and on the stacked experts (corept.get_peft_model's
    default) is counted exactly, and the routed width is top-k experts of the expert's width."""
    import corept
    from corept import tiny

    config = tiny.tiny_config(model_type, **kw)
    shape = model_shape(config)
    real = corept.get_peft_model(tiny.tiny_model(model_type, **kw), r=4, lora_alpha=8,
                                 use_gradient_checkpointing=False)
    assert shape.lora_params(4) == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert shape.expert_lora_unit > 0 and shape.intermediate == 32 * 2


def test_moe_qlora_counts_the_nf4_experts(tmp_path):
    """Under QLoRA corept stores the stacked experts in NF4 as well: the planner's quantized count is
    every 4-bit tensor of ``corept.load(..., load_in_4bit=True)``, experts included."""
    import corept
    from corept import tiny

    kw = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
              mlp_only_layers=[])
    folder = tiny.save_tiny(tiny.tiny_model("qwen3_moe", **kw), tiny.tiny_tokenizer(["a b"]), tmp_path)
    model, _ = corept.load(str(folder), load_in_4bit=True, dtype=torch.bfloat16, max_seq_length=64)
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    experts = [p for p in model.parameters() if getattr(p, "ds_shape", None) is not None]
    assert len(experts) == 4  # gate_up and down, 2 layers
    shape = model_shape(tiny.tiny_config("qwen3_moe", **kw))
    assert (shape.n_quantized, shape.n_quant_tensors) == (sum(math.prod(s.shape) for s in states), len(states))
