"""One fused call for the q/k/v LoRA linears of an attention module.

transformers' attention forwards call ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after the
other on the same ``h``. :class:`QKVGroup` lets the first of the three run all three projections
in one ``corept_kernels.lora.lora_qkv`` call and hand the other two outputs to the calls that
follow.
"""
from __future__ import annotations

import copy

import torch
from corept_kernels.lora import lora_qkv, read_lora_weights

from corept.lora.fast_path import group_reason, is_training_call


class QKVGroup:
    """The q/k/v LoRA linears of one attention module, run as one ``lora_qkv`` call.

    transformers' attention forwards call ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after
    the other on the same ``h``. The first of the three called (in training, with gradients) runs
    all three projections in one fused call and keeps the other two outputs for the calls that
    follow with the same input (the same tensor object at the same version, and adapter weights
    at the same versions); each output is handed out once, and the kept ones are dropped as soon as
    both are taken, or replaced by the next call that does not match (an output nobody asks for,
    e.g. after a caller that runs only ``q_proj``, stays referenced, with its graph, until then:
    :meth:`clear` drops it). One fused node then gives ``h`` its gradient in peft's accumulation
    order (``corept_kernels.lora.autograd``), where three separate calls would add three
    pre-summed gradients in another order.

    :param mods: the peft LoRA linears ``(q_proj, k_proj, v_proj)``.
    """

    def __init__(self, mods, names=("q_proj", "k_proj", "v_proj")):
        self.mods = tuple(mods)
        self.names = tuple(names)
        self._kept = None  # (x, x._version, weight versions, {index: output})

    def _versions(self) -> tuple:
        """Versions of the adapter weights (the trainable tensors of a fast-path linear, which has
        no bias): an optimizer step in between invalidates kept outputs. Read from the adapter
        dicts, not ``parameters()``, whose module walk is repeated for every attention call."""
        return tuple(lin.weight._version for m in self.mods for d in (m.lora_A, m.lora_B) for lin in d.values())

    def ready(self, x: torch.Tensor) -> bool:
        """All three taking the fused path for ``x`` (:func:`is_training_call`), with one adapter dtype."""
        return all(is_training_call(m, x) for m in self.mods) and group_reason(self.mods, self.names) is None

    def output(self, module, x: torch.Tensor) -> torch.Tensor | None:
        """``module``'s projection of ``x`` (``[..., H]`` -> ``[..., out]``), from a kept output or a
        fresh fused call of all three; ``None`` when the three cannot run fused now (:meth:`ready`)."""
        idx = next(i for i, m in enumerate(self.mods) if m is module)
        # Traced by torch.compile, the three calls are one graph in which nothing is modified in
        # between, and version counters cannot be read (data-dependent): identity suffices there.
        compiling = torch.compiler.is_compiling()
        versions, x_version = ((), 0) if compiling else (self._versions(), x._version)
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == x_version and kept[2] == versions and idx in kept[3]:
            out = kept[3].pop(idx)
            if not kept[3]:
                self._kept = None
            return out
        if not self.ready(x):
            return None
        outs = lora_qkv(x, *(read_lora_weights(m) for m in self.mods))  # ready(x) checked them
        self._kept = (x, x_version, versions, {i: o for i, o in enumerate(outs) if i != idx})
        return outs[idx]

    def clear(self) -> None:
        """Drop the kept outputs (and the autograd graph they hold)."""
        self._kept = None

    def __deepcopy__(self, memo):
        new = QKVGroup.__new__(QKVGroup)
        memo[id(self)] = new
        new.mods, new.names, new._kept = copy.deepcopy(self.mods, memo), self.names, None
        return new

    def __getstate__(self):
        return {"mods": self.mods, "names": self.names, "_kept": None}
