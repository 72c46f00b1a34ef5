"""GGUF export in pure Python: K-quant quantizers (:mod:`.quants`), the per-tensor mix rule
(:mod:`.mix`), names and layouts from the plugins' declarations (:mod:`.names`), metadata
(:mod:`.metadata`), the tokenizer (:mod:`.vocab`), the writer (:mod:`.writer`) and reading a file
back into transformers names (:mod:`.readback`)."""
from corept.export.gguf.mix import MIXES
from corept.export.gguf.writer import GGUFJob, prepare

__all__ = ["MIXES", "GGUFJob", "prepare"]
