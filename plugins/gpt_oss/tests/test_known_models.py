"""The declared gpt-oss checkpoints: aliases resolve offline, and the planner's configs have the
published shapes (total parameters as on OpenAI's model cards: 20.91B and 116.83B)."""
import pytest
from transformers import AutoConfig

from corept.planning import model_shape
from corept.planning.known import known_config


@pytest.mark.parametrize("name,repo,layers,experts,params", [
    ("gpt-oss-20b", "openai/gpt-oss-20b", 24, 32, 20_914_757_184),
    ("gpt-oss-120b", "openai/gpt-oss-120b", 36, 128, 116_829_156_672),
])
def test_known_models_plan_offline(name, repo, layers, experts, params):
    shape = model_shape(name)
    assert (shape.name, shape.model_type, shape.plugin) == (repo, "gpt_oss", "gpt_oss") and shape.patched
    assert "built-in copy" in shape.source
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (
        layers, 2880, 64, 8, 64, 201088)
    assert shape.n_params == params and not shape.tied
    assert known_config(name)[1]["num_local_experts"] == experts
    # the experts are parameters, not linears: LoRA and bitsandbytes see the attention projections only
    assert shape.lora_targets == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert all(lin.bias for lin in shape.linears if lin.short in shape.lora_targets)


def test_known_config_fields():
    name, config = known_config("unsloth/gpt-oss-20b")
    assert name == "openai/gpt-oss-20b"
    c = AutoConfig.for_model(config.pop("model_type"), **config)
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.sliding_window) == (32, 4, 2880, 128)
    assert c.layer_types[:4] == ["sliding_attention", "full_attention"] * 2 and len(c.layer_types) == 24
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 32.0
    assert c.rope_parameters["rope_theta"] == 150000.0 and c.attention_bias and c.swiglu_limit == 7.0
