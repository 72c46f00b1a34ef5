"""The fused LoRA paths: MLP, q/k/v and single projections of peft LoRA linears.

Public functions and weights readers (:mod:`~corept_kernels.lora.api`,
:mod:`~corept_kernels.lora.weights`), the autograd Functions (:mod:`~corept_kernels.lora.autograd`
for q/k/v and single projections, :mod:`~corept_kernels.lora.mlp` for the MLP), the
sequence-tiled MLP (:mod:`~corept_kernels.lora.tiled`), the fp32-adapter branch on bf16
models (:mod:`~corept_kernels.lora.branch`, :mod:`~corept_kernels.lora.rank_add`), the gated
activation inside the MLP (:mod:`~corept_kernels.lora.activation`) and the row-chunk bound of
their temporaries (:mod:`~corept_kernels.lora.chunks`).

The byte constants re-exported here are for reading; a test that changes one must set it on its
defining module (``lora.chunks.CHUNK_BYTES``, ``lora.tiled.MLP_TILE_MIN_BYTES`` /
``MLP_TILE_BYTES``), which is where the kernels read it.
"""
from corept_kernels.lora.activation import ACTIVATIONS
from corept_kernels.lora.api import lora_mlp, lora_o, lora_qkv
from corept_kernels.lora.chunks import CHUNK_BYTES
from corept_kernels.lora.tiled import MLP_TILE_BYTES, MLP_TILE_MIN_BYTES, mlp_tile_rows
from corept_kernels.lora.weights import LoraWeights, lora_fast_path_reason, lora_weights_from_peft, read_lora_weights

__all__ = ["LoraWeights", "lora_mlp", "lora_qkv", "lora_o", "lora_fast_path_reason", "lora_weights_from_peft",
           "read_lora_weights", "ACTIVATIONS", "mlp_tile_rows", "CHUNK_BYTES", "MLP_TILE_MIN_BYTES",
           "MLP_TILE_BYTES"]
