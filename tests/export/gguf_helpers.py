"""Shared helpers of the GGUF tests: the plain inverse of the K-quant dequantizers, tokenizers."""
from __future__ import annotations

import torch


def _six_bit(v):
    top = v.amax(-1, keepdim=True)
    d = (top / 63).half().float()
    return d * torch.where(top > 0, torch.round(v * 63 / top.clamp_min(1e-30)), torch.zeros_like(v))


def plain_inverse(name: str, x: torch.Tensor) -> torch.Tensor:
    """The plain inverse of a K-quant's dequantizer, the yardstick corept's quantizers must meet:
    Q4_K/Q5_K scale = range / nmax and offset = min(x, 0) per 32 values, both held in 6 bits under
    fp16 super-scales; Q6_K scale = max|x| / 31 per 16 values, held in int8 under an fp16
    super-scale; values rounded to the nearest step."""
    name = name.lower()
    if name in ("q4_k", "q5_k"):
        nmax = 15 if name == "q4_k" else 31
        s = x.reshape(-1, 8, 32)
        lo = s.amin(2).clamp(max=0)
        step = _six_bit((s.amax(2) - lo) / nmax)[..., None]
        off = _six_bit(-lo)[..., None]
        q = torch.where(step > 0, torch.round((s + off) / step.clamp_min(1e-30)), torch.zeros_like(s)).clamp(0, nmax)
        return (step * q - off).reshape(x.shape)
    s = x.reshape(-1, 16, 16)
    scale = s.abs().amax(2) / 31
    top = scale.amax(1, keepdim=True)
    d = (top / 127).half().float()
    step = (d * torch.where(top > 0, torch.round(scale * 127 / top.clamp_min(1e-30)), torch.zeros_like(scale)))[..., None]
    q = torch.where(step > 0, torch.round(s / step.clamp_min(1e-30)), torch.zeros_like(s)).clamp(-32, 31)
    return (step * q).reshape(x.shape)


def byte_fallback_tokenizer(texts):
    """A BPE over text with byte fallback and a leading-space marker, as transformers represents
    SentencePiece tokenizers (Llama 2, Mistral, Gemma): GGUF's ``llama`` tokenizer model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(list(texts) * 3, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
