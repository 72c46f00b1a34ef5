"""The per-tensor type rule of the GGUF quantization mixes."""
import pytest
from gguf import GGMLQuantizationType as Q

from corept.export.gguf.mix import tensor_type

W = (4096, 4096)


def test_q4_k_m_gives_more_bits_to_attn_v_and_ffn_down_of_chosen_layers():
    n = 32
    chosen = [i for i in range(n) if tensor_type("q4_k_m", f"blk.{i}.attn_v.weight", W, n, False) == Q.Q6_K]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(n) if tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", W, n, False) == Q.Q6_K] == chosen
    assert {tensor_type("q4_k_m", f"blk.{i}.attn_q.weight", W, n, False) for i in range(n)} == {Q.Q4_K}
    assert {tensor_type("q5_k_m", f"blk.{i}.ffn_up.weight", W, n, False) for i in range(n)} == {Q.Q5_K}
    assert {tensor_type("q6_k", f"blk.{i}.attn_v.weight", W, n, False) for i in range(n)} == {Q.Q6_K}


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
def test_head_is_q6_k_and_tied_embedding_serves_as_head(mix):
    assert tensor_type(mix, "output.weight", (128256, 4096), 32, False) == Q.Q6_K
    base = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}[mix]
    assert tensor_type(mix, "token_embd.weight", (128256, 4096), 32, False) == base
    assert tensor_type(mix, "token_embd.weight", (128256, 4096), 32, True) == Q.Q6_K


@pytest.mark.parametrize("mix,fallback", [("q4_k_m", Q.Q5_0), ("q5_k_m", Q.Q5_1), ("q6_k", Q.Q8_0)])
def test_rows_not_a_multiple_of_256_fall_back(mix, fallback):
    assert tensor_type(mix, "blk.5.attn_q.weight", (576, 576), 30, False) == fallback
    assert tensor_type(mix, "blk.5.attn_q.weight", (64, 40), 30, False) == Q.F16


@pytest.mark.parametrize("mix,kind", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)])
def test_plain_mixes_and_vectors(mix, kind):
    assert tensor_type(mix, "blk.0.ffn_down.weight", W, 32, False) == kind
    assert tensor_type(mix, "output.weight", W, 32, False) == kind
    assert tensor_type(mix, "blk.0.attn_norm.weight", (4096,), 32, False) == Q.F32
    assert tensor_type(mix, "rope_freqs.weight", (64, 1), 32, False) == Q.F32
