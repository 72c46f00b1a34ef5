"""Row chunks that bound the fused LoRA paths' temporaries of ``[N, width]`` activations.

Casts of activations to the adapter dtype, rank-``r`` products added into model-dtype tensors and
the MLP backward's ``dh`` run over row chunks of at most :data:`CHUNK_BYTES` each, so their
temporaries stay bounded whatever the token count ``N``.
"""
from __future__ import annotations

CHUNK_BYTES = 64 << 20
"""Upper bound (bytes) of one row chunk of a temporary copy or product of an ``[N, width]``
activation made by the fused LoRA paths."""


def product_rows(n: int, width: int, itemsize: int) -> list[slice]:
    """Row slices of ``[n, width]`` whose temporaries of ``itemsize`` bytes per element take at
    most :data:`CHUNK_BYTES` each (one slice ``[0:0]`` when ``n`` is 0). The fewest chunks that
    fit, of equal size (within a row): the largest temporary is then as small as that many chunks
    allow (4096 rows of a 14336-wide bf16 ``dh``: two chunks of 2048 rows, 56 MiB, not 2340 + 1756
    rows with a 64 MiB first one)."""
    most = max(1, CHUNK_BYTES // max(1, width * itemsize))
    if n <= 0:
        return [slice(0, 0)]
    chunks = -(-n // most)
    step = -(-n // chunks)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]
