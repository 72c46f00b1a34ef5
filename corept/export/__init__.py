"""Export for deployment: GGUF (:mod:`corept.export.gguf`)."""
