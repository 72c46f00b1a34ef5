"""The torch GGUF quantizers against the ``gguf`` package's dequantizers (the format's reference).

Every block's bytes must decode, through ``gguf.quants.dequantize``, to exactly the values the
quantizer reports; Q8_0 must match the ``gguf`` package's own (bit-exact to ggml) quantizer byte
for byte; and each K-quant's error must be no worse than the plain inverse of its dequantizer
(``gguf_helpers.plain_inverse``: each sub-block's scale from its range, values rounded to the
nearest step).
"""
import gguf
import numpy as np
import pytest
import torch

from corept.export.gguf.quants import QUANTIZERS, quantize_q8_0
from gguf_helpers import plain_inverse

TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
         "q5_k": gguf.GGMLQuantizationType.Q5_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}


def hard_rows(cols: int = 768) -> torch.Tensor:
    """Rows that stress a block quantizer: gaussian, heavy-tailed, one outlier, all zero, constant
    positive, all negative, tiny (fp16-subnormal scales) and large values."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(cols, generator=g) * 0.02,
            torch.distributions.StudentT(2.0).sample((cols,)) * 0.01,
            torch.randn(cols, generator=g) * 0.02,
            torch.zeros(cols),
            torch.full((cols,), 0.37),
            -torch.rand(cols, generator=g) - 0.1,
            torch.randn(cols, generator=g) * 1e-6,
            torch.randn(cols, generator=g) * 40.0]
    rows[2][5] = 3.0
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_bytes_decode_to_reported_values(name):
    x = hard_rows()
    blocks, values = QUANTIZERS[name](x)
    decoded = gguf.quants.dequantize(blocks.numpy(), TYPES[name])
    assert decoded.shape == tuple(x.shape)
    torch.testing.assert_close(torch.from_numpy(decoded), values, rtol=1e-6, atol=0)
    assert torch.isfinite(values).all()
    assert values[3].abs().max() == 0  # an all-zero row stays zero


def test_q8_0_matches_gguf_bytes():
    x = hard_rows(96)
    ours = quantize_q8_0(x)[0].numpy()
    assert np.array_equal(ours, gguf.quants.quantize(x.numpy(), TYPES["q8_0"]))


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("data", ["gaussian", "heavy_tailed"])
def test_k_quant_error_no_worse_than_plain_inverse(name, data):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=g) * 0.02
    if data == "heavy_tailed":
        x = torch.distributions.StudentT(3.0).sample((64, 1024)) * 0.02
    ours = (QUANTIZERS[name](x)[1] - x).pow(2).mean()
    plain = (plain_inverse(name, x) - x).pow(2).mean()
    assert ours <= plain, f"{name} {data}: mean squared error {ours:.3e} > plain inverse {plain:.3e}"


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_rejects_rows_that_do_not_fill_blocks(name):
    with pytest.raises(ValueError, match="multiple of"):
        QUANTIZERS[name](torch.zeros(2, 250))
    with pytest.raises(ValueError, match="2-D"):
        QUANTIZERS[name](torch.zeros(512))
