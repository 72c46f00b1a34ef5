"""Tiny models and measurements for the planner tests (CPU, offline).

``saved_bytes`` runs one forward+backward under ``torch.autograd.graph.saved_tensors_hooks`` and
attributes every saved tensor's storage to the decoder layer that was running when autograd saved
it (or to ``"outside"``), counting each storage once per scope and skipping parameters and
buffers. Storages saved by more than one layer (the RoPE cos/sin tables) are reported under
``"shared"`` instead: the planner counts them once per step, not per layer.
"""
from __future__ import annotations

import collections

import torch

VOCAB = 257


def tiny_config(model_type: str, **overrides):
    """hidden 64, intermediate 96, 2 layers, 4 query / 2 kv heads of 32, vocab 257."""
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=512,
              tie_word_embeddings=False)
    if model_type == "qwen2":
        kw.pop("head_dim")  # qwen2 configs have no head_dim: hidden / heads = 16
    if model_type in ("gemma2", "gemma3_text"):
        kw.update(sliding_window=4096, query_pre_attn_scalar=32)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build(config, method: str, r: int = 4, dtype=torch.bfloat16, checkpointing=False):
    """A corept-patched tiny model: with corept LoRA adapters (``lora``) or every weight trainable (``full``)."""
    from transformers import AutoModelForCausalLM

    import corept

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    corept.patch(model)
    if method == "lora":
        model = corept.get_peft_model(model, r=r, lora_alpha=2 * r, use_gradient_checkpointing=checkpointing)
    model.train()
    return model


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def saved_bytes(model, batch: int, seq: int) -> dict:
    """``{layer index | "outside" | "shared": bytes}`` saved for backward by one training step."""
    scope = ["outside"]
    hooks = []
    def enter(i):
        def hook(module, args):
            scope.append(i)
        return hook

    def leave(module, args, output):
        scope.pop()  # returns None: the layer's output is left alone

    for i, layer in enumerate(_layers(model)):
        hooks.append(layer.register_forward_pre_hook(enter(i)))
        hooks.append(layer.register_forward_hook(leave))
    packed = collections.defaultdict(dict)

    def pack(t):
        st = t.untyped_storage()
        packed[scope[-1]][st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    layer_keys = [k for k in packed if k != "outside"]
    seen = collections.Counter(p for k in layer_keys for p in packed[k])
    result = {"shared": 0}
    shared_done = set()
    for k, storages in packed.items():
        result[k] = 0
        for ptr, n in storages.items():
            if ptr in own:
                continue
            if k != "outside" and seen[ptr] > 1:
                if ptr not in shared_done:
                    shared_done.add(ptr)
                    result["shared"] += n
                continue
            result[k] += n
    return result
