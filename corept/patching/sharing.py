"""One object per definition, shared by every instance it serves.

corept patches instances, but the functions it installs on the decoder layers of one model are equal
layer by layer (the same code, the same rebound globals, the same replaced forward). They must also
be the *same objects*: ``torch.compile`` guards a compiled layer on the identity of the functions
and globals it traced through, so a copy per layer fails those guards at every layer. Each layer then
compiles again, and past ``torch._dynamo.config.recompile_limit`` (8) the rest of an 8B model runs
eager. :func:`shared` hands out one object per key while any patched instance still uses it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared(key: Hashable, make: Callable[[], T]) -> T:
    """The live object made for ``key``, or ``make()`` (then kept for ``key`` while it lives).

    ``key`` must name everything the object depends on; objects in it are held (strongly) as long
    as the shared object lives. Name by ``id`` only objects the shared object itself keeps alive.
    """
    found = _LIVE.get(key)
    if found is None:
        found = make()
        _LIVE[key] = found
    return found
