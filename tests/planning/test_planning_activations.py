"""The activation formulas against what autograd really saves (saved_tensors_hooks, CPU, bf16).

Each case builds a tiny corept-patched model, runs one training step with checkpointing off and
compares the bytes saved while decoder layer 1 ran (layer 0's input needs no grad without
checkpointing's input hook) with :func:`corept.planning.activations.layer_bytes`, at two sequence lengths
so the per-token and the per-token-per-seq (eager attention scores) terms are both pinned.
"""
import pytest
import torch
from planning_helpers import build, saved_bytes, tiny_config

from corept.planning import model_shape
from corept.planning.activations import SCHEDULE_BYTES, layer_bytes, loss_chunk_tokens, projection_paths

CASES = [  # model_type, method, attention path the planner uses (CPU's SDPA: flash-like)
    ("llama", "lora", "flash"),
    ("mistral", "lora", "flash"),
    ("qwen2", "lora", "flash"),    # q/k/v carry a bias: the fused path adds it
    ("qwen3", "lora", "flash"),    # per-head q/k norms
    ("gemma", "lora", "flash"),    # GeGLU
    ("gemma2", "lora", "varlen"),  # an eager model with softcap: corept's varlen kernel
    ("llama", "full", "flash"),
    ("gemma2", "full", "varlen"),
]


@pytest.mark.parametrize("model_type,method,attention", CASES)
def test_layer_saved_bytes_match_autograd(model_type, method, attention):
    config = tiny_config(model_type)
    model = build(config, method, r=4)
    shape = model_shape(config)
    assert shape.layer.attention == ("varlen" if attention == "varlen" else "sdpa")
    lb = layer_bytes(shape, method, 4, 2, attention)
    for batch, seq in ((1, 8), (2, 16)):
        measured = saved_bytes(model, batch=batch, seq=seq)
        assert measured[1] - _schedule_rounding(shape, batch * seq, attention) == lb.saved_per_token(seq) * batch * seq, \
            (seq, measured, lb.saved)


def _schedule_rounding(shape, n: int, attention: str) -> int:
    """The varlen kernel's schedule is ``(tiles + documents)`` rows rounded up to 4, of 24 bytes; the
    plan counts 24 bytes a token (one document row each): the difference, exact for this call."""
    if attention != "varlen":
        return 0
    from corept_kernels.attention.varlen_launch import blocks, schedule_rows

    tile = blocks(shape.head_dim, torch.bfloat16, torch.device("cpu")).tile
    return 24 * schedule_rows(n, n, tile) - SCHEDULE_BYTES * n


def test_layer0_saves_its_input_once_inputs_require_grad():
    """With corept checkpointing on, the embedding output requires grad, so layer 0 = layer 1."""
    config = tiny_config("llama")
    model = build(config, "lora", r=4, checkpointing="corept")
    model.get_base_model().gradient_checkpointing_disable()  # keep the hook, measure the plain graph
    measured = saved_bytes(model, batch=1, seq=8)
    assert measured[0] == measured[1]


def test_outside_layers_saved_bytes():
    """Final norm: input [N, H] + fp32 rstd; full FT adds the embedding's int64 ids."""
    config = tiny_config("llama")
    N, H = 8, config.hidden_size
    lora = saved_bytes(build(config, "lora", r=4), batch=1, seq=8)
    assert lora["outside"] == 2 * H * N + 4 * N
    full = saved_bytes(build(config, "full"), batch=1, seq=8)
    assert full["outside"] == 2 * H * N + 4 * N + 8 * N


def test_rope_tables_are_shared_not_per_layer():
    config = tiny_config("llama")
    measured = saved_bytes(build(config, "lora", r=4), batch=2, seq=8)
    assert measured["shared"] == 2 * 2 * 8 * 32  # cos + sin [1, S, head_dim] bf16, once per step


def test_projection_paths_follow_targets_and_patching():
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")
    assert projection_paths(model_shape(tiny_config("llama")), "lora") == dict.fromkeys(every, "fused")
    # biased q/k/v (qwen2) run fused too: the fused LoRA functions add the base bias
    assert projection_paths(model_shape(tiny_config("qwen2")), "lora") == dict.fromkeys(every, "fused")
    assert projection_paths(model_shape(tiny_config("gpt2")), "lora")["q_proj"] == "frozen"  # no q_proj at all
    assert set(projection_paths(model_shape(tiny_config("llama")), "full").values()) == {"trainable"}


@pytest.mark.parametrize("n", [1, 100, 511, 512, 4096, 8192, 16384, 100_000])
@pytest.mark.parametrize("hidden,vocab", [(4096, 128256), (4096, 151936), (2048, 128256), (64, 257)])
def test_loss_chunk_is_the_kernels_rule(n, hidden, vocab):
    from corept_kernels.fused_linear_ce import CHUNK_BUDGET_BYTES

    c = loss_chunk_tokens(n, hidden, vocab, 2)
    assert 1 <= c <= n
    assert c & (c - 1) == 0 or c == n  # a power of two unless capped by n
    if c < n:  # the chunk's logits respect the larger of the two rules' sizes
        assert c * vocab * 2 <= max(CHUNK_BUDGET_BYTES, 2 * -(-n // -(-vocab // hidden)) * vocab * 2)


def test_offload_threshold_matches_checkpointing():
    from corept.training.checkpointing import MIN_OFFLOAD_TOKENS
    from corept.planning.estimate import MIN_OFFLOAD_TOKENS as planned

    assert planned == MIN_OFFLOAD_TOKENS


def test_eager_scores_grow_with_seq_squared():
    shape = model_shape(tiny_config("gemma2"))
    lb = layer_bytes(shape, "lora", 4, 2, "eager")
    per_seq = sum(q for _, q in lb.saved.values())
    assert per_seq == (4 + 2 + 2) * shape.heads  # fp32 softmax + bf16 probs + bf16 tanh (softcap)
    per_layer = [lb.saved_per_token(s) * s for s in (16, 32, 64)]
    assert per_layer[2] - per_layer[1] > 2 * (per_layer[1] - per_layer[0])  # superlinear in seq


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tiled_mlp_saved_bytes_match_autograd(model_type, monkeypatch):
    """Past the tiling threshold (lowered here so tiny calls cross it) the fused MLP saves its input
    only, and the formula with ``tokens`` says so; below it, the untiled formula holds."""
    from corept_kernels.lora import tiled as lora_tiled

    config = tiny_config(model_type)
    model = build(config, "lora", r=4)
    shape = model_shape(config)
    pair = 2 * 2 * shape.layer.linears["gate_proj"].out_features  # e and g, bf16, per token
    monkeypatch.setattr(lora_tiled, "MLP_TILE_MIN_BYTES", 20 * pair)  # tiled above 20 tokens per call
    monkeypatch.setattr(lora_tiled, "MLP_TILE_BYTES", 7 * pair)
    for batch, seq in ((1, 8), (2, 16)):
        n = batch * seq
        lb = layer_bytes(shape, "lora", 4, 2, "flash", tokens=n)
        measured = saved_bytes(model, batch=batch, seq=seq)
        assert measured[1] == lb.saved_per_token(seq) * n, (seq, measured, lb.saved)
        untiled = layer_bytes(shape, "lora", 4, 2, "flash")
        assert (lb.saved["mlp"] == untiled.saved["mlp"]) == (n <= 20), (n, lb.saved["mlp"], untiled.saved["mlp"])


MOE_CASES = [  # model_type, config overrides, attention path
    ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                       mlp_only_layers=[]), "flash"),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=80, decoder_sparse_step=1,
                       mlp_only_layers=[]), "flash"),
    ("gpt_oss", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, head_dim=16), "varlen"),  # sinks, eager
]


@pytest.mark.parametrize("model_type,kw,attention", MOE_CASES)
def test_moe_layer_saved_bytes_bound_autograd(model_type, kw, attention):
    """Mixture-of-experts layers (LoRA on attention and the stacked experts): the routed-experts terms
    never under-count what autograd saves per token (auto checkpointing would keep layers that do not
    fit), and over-count by at most 20% (the gate's intermediates are a measured multiple)."""
    config = tiny_config(model_type, **kw)
    model = build(config, "lora", r=4)
    lb = layer_bytes(model_shape(config), "lora", 4, 2, attention)
    small, large = (saved_bytes(model, batch=b, seq=16)[1] for b in (1, 4))
    per_token = (large - small) / (3 * 16)  # the token-independent part (cast LoRA factors) cancels
    assert per_token <= lb.saved_per_token(16) <= 1.2 * per_token, (per_token, lb.saved)
