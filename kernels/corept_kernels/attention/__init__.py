"""Attention kernels. :func:`varlen_attention`: causal attention within the documents of a packed
token stream (``cu_seqlens``), with GQA, transformers' sliding window and Gemma-2's softcap."""
from corept_kernels.attention.varlen import varlen_attention

__all__ = ["varlen_attention"]
