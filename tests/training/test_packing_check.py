"""``corept.training.packing_check.crosses_documents`` against the ground truth: the second document
of a packed row run alone vs inside the row."""
import pytest
import torch

import corept
from corept.tiny import tiny_model
from corept.training.packing_check import LENGTHS, _packed_row, crosses_documents


def _truth(model) -> bool:
    """Whether the packed row's second document differs from that document run alone."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    first, second = (torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS)
    model.eval()
    with torch.no_grad():
        packed = model(**_packed_row([first, second], "cpu")).logits[0, LENGTHS[0]:]
        alone = model(input_ids=second[None], use_cache=False).logits[0]
    return not torch.allclose(packed, alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


def test_a_patched_model_keeps_documents_apart():
    model = corept.patch(tiny_model("llama"))
    assert not _truth(model)
    assert crosses_documents(model) is False


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_probe_agrees_with_the_truth(attn):
    """gpt-oss's forward builds its masks without position ids (transformers 5.17-5.25): packed rows
    cross there; llama's does not. The probe must say what the model does, whichever it is."""
    for model_type in ("llama", "gpt_oss"):
        torch.manual_seed(0)
        kw = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32) if model_type == "gpt_oss" else {}
        model = tiny_model(model_type, **kw)
        model.config._attn_implementation = attn if model_type == "llama" else "eager"
        assert crosses_documents(model) is _truth(model), model_type
