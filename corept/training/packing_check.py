"""Does a loaded model keep packed documents apart? Checked before ``corept train`` packs.

Padding-free packing puts several documents in one row: ``position_ids`` restart at 0 for each
document and TRL's collator adds their boundaries (``cu_seq_lens_q/k``). Whether attention then
stays inside each document depends on the attention path the model runs: corept's varlen kernel
and transformers' packed paths do; a model whose forward builds its masks without the position ids
(transformers' gpt-oss in 5.17-5.25, on its eager attention) lets every token see the documents
before it, and the training signal is silently wrong.

:func:`crosses_documents` runs the model itself on a packed row of two short documents, twice,
with the first document's tokens changed the second time; if the second document's logits move,
attention crossed the boundary. Two forwards of nine tokens: negligible next to training.
"""
from __future__ import annotations

import torch
import torch.nn as nn

LENGTHS = (5, 4)


def _packed_row(docs: list[torch.Tensor], device) -> dict:
    ids = torch.cat(docs)[None].to(device)
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None].to(device)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS), "use_cache": False}


def crosses_documents(model: nn.Module) -> bool:
    """Whether the second document of a packed row sees the first (its logits move when the first
    document's tokens change by more than rounding: 1e-3 of the largest logit)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(p for p in base.parameters() if p.is_floating_point())
    vocab = base.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS)
    changed = (first + 1 + torch.randint(0, vocab - 1, first.shape, generator=g)) % vocab
    training = base.training
    base.eval()
    try:
        with torch.no_grad():
            a, b = (base(**_packed_row([f, second], param.device)).logits[0, LENGTHS[0]:].float()
                    for f in (first, changed))
    finally:
        base.train(training)
    scale = a.abs().max().item() or 1.0
    return (a - b).abs().max().item() > 1e-3 * scale
