"""GGUF export in pure Python: K-quant quantizers (:mod:`.quants`, torch only), the per-tensor mix
rule (:mod:`.mix`), names and layouts from the plugins' declarations (:mod:`.names`), metadata
(:mod:`.metadata`), the tokenizer (:mod:`.vocab`), the writer (:mod:`.writer`: ``prepare`` then
``write``) and reading a file back into transformers names (:mod:`.readback`).

Nothing is imported here, so the quantizers load without the ``gguf`` package (the benchmarks
time them on machines that lack it).
"""
