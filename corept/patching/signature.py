"""Forwards that keep the signature of the forward they replace.

transformers reads forward signatures: ``generate()`` builds an attention mask and position ids
only for forwards that name them, and the ``Trainer`` keeps only the dataset columns the model's
forward names. An installed forward therefore takes exactly the replaced one's parameters (names,
order, kinds, defaults) and reports its exact signature (annotations included) to ``inspect``.

The wrapper is generated as source (as ``dataclasses`` generates ``__init__``), so a call costs one
extra frame and no argument binding at run time.
"""
from __future__ import annotations

import inspect
import itertools
import sys
import types
import weakref
from typing import Callable

P = inspect.Parameter
_counter = itertools.count()
_SELF = "__corept_self"


def unbound_forward(module) -> Callable:
    """The function behind ``module``'s current forward, called with the module first."""
    current = module.__dict__.get("forward")
    if current is None:
        return type(module).forward
    if isinstance(current, types.MethodType) and current.__self__ is module:
        return current.__func__
    return _Unbound(current)


class _Unbound:
    """An instance ``forward`` not bound to its module (a plain callable), called as ``f(self, ...)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, _module, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, _Unbound) and other.fn is self.fn

    def __hash__(self):
        return id(self.fn)


def forward_signature(module) -> inspect.Signature:
    """The signature of ``module.forward`` as callers see it (without ``self``)."""
    return inspect.signature(module.forward)


def faithful_forward(module, impl: Callable, *, call_style: str = "positional") -> Callable:
    """A function to bind to ``module`` as its forward, with the signature of its current forward.

    :param impl: called as ``impl(self, *values)`` with every parameter of the current forward in
        order (``*args`` spread, keyword-only ones by keyword, ``**kwargs`` spread), or, with
        ``call_style="mapping"``, as ``impl(self, arguments)`` with one dict of every argument by
        name (``**kwargs`` merged in; the forward may then take no ``*args``); arguments whose value
        is their parameter's default object are left out of that dict.
    """
    current = module.forward
    return faithful(inspect.signature(current), impl, call_style=call_style, bound=True,
                    name=getattr(current, "__name__", "forward"), doc=getattr(current, "__doc__", None),
                    qualname=getattr(current, "__qualname__", None))


def faithful(sig: inspect.Signature, impl: Callable, *, call_style: str = "positional", bound: bool = False,
             name: str = "forward", doc: str | None = None, qualname: str | None = None) -> Callable:
    """A function whose signature is ``sig`` and which calls ``impl`` (see :func:`faithful_forward`).

    :param bound: the function will be bound to an instance: a ``self`` parameter is prepended
        (hidden from ``inspect`` once bound) and passed to ``impl`` first.
    """
    params = list(sig.parameters.values())
    scope = {"__corept_impl": impl}
    decl, call, named = ([_SELF], [_SELF], []) if bound else ([], [], [])
    star_done = False
    for i, p in enumerate(params):
        default = ""
        if p.default is not P.empty:
            scope[f"__corept_d{i}"] = p.default
            default = f"=__corept_d{i}"
        n = p.name
        if p.kind is P.POSITIONAL_ONLY:
            decl.append(f"{n}{default}")
            if i + 1 == len(params) or params[i + 1].kind is not P.POSITIONAL_ONLY:
                decl.append("/")
        elif p.kind is P.POSITIONAL_OR_KEYWORD:
            decl.append(f"{n}{default}")
        elif p.kind is P.VAR_POSITIONAL:
            decl.append(f"*{n}")
            star_done = True
        elif p.kind is P.KEYWORD_ONLY:
            if not star_done:
                decl.append("*")
                star_done = True
            decl.append(f"{n}{default}")
        else:
            decl.append(f"**{n}")
        if p.kind is P.VAR_POSITIONAL:
            if call_style == "mapping":
                raise TypeError(f"a forward taking *{n} cannot be replaced by a mapping-style one")
            call.append(f"*{n}")
        elif p.kind is P.VAR_KEYWORD:
            call.append(f"**{n}")
            named.append(f"__corept_m.update({n})")
        elif p.kind is P.KEYWORD_ONLY:
            call.append(f"{n}={n}")
            named.append(f"if {n} is not __corept_d{i}: __corept_m[{n!r}] = {n}" if default else
                         f"__corept_m[{n!r}] = {n}")
        else:
            call.append(n)
            named.append(f"if {n} is not __corept_d{i}: __corept_m[{n!r}] = {n}" if default else
                         f"__corept_m[{n!r}] = {n}")
    if call_style == "mapping":
        # arguments left at their default are left out: called with the mapping, the replaced forward
        # then applies its own defaults and deprecation shims (transformers 5.24 renamed
        # ``past_key_values`` to ``cache`` behind ``deprecate_kwarg``, which keeps an explicit
        # ``cache=None`` over a caller's ``past_key_values=``)
        body = "\n    ".join(["__corept_m = {}"] + named + [
            f"return __corept_impl({', '.join(call[:1] if bound else [])}{', ' if bound else ''}__corept_m)"])
    else:
        body = f"return __corept_impl({', '.join(call)})"
    source = f"def {name}({', '.join(decl)}):\n    {body}\n"
    exec(compile(source, f"<corept faithful {name} #{next(_counter)}>", "exec"), scope)  # noqa: S102
    fn = scope[name]
    if bound:
        kind = P.POSITIONAL_ONLY if params and params[0].kind is P.POSITIONAL_ONLY else P.POSITIONAL_OR_KEYWORD
        sig = sig.replace(parameters=[P("self", kind)] + params)
    fn.__signature__ = sig
    fn.__doc__ = doc
    fn.__qualname__ = qualname or name
    fn.__corept_impl__ = impl
    return fn


def innermost(fn: Callable) -> Callable:
    """``fn`` below every decorator that kept ``__wrapped__`` (the function whose globals it reads)."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def clone_with_globals(fn: types.FunctionType, overrides: dict) -> types.FunctionType:
    """A copy of ``fn`` (its innermost function, below any decorator) whose global lookups see
    ``overrides`` first; ``fn`` itself is untouched. Same code, so the same signature.

    The copy's globals are the namespace of a module of its own (``corept._forward_clone<n>``, in
    ``sys.modules`` while the copy lives): ``torch.compile`` guards a function's globals through the
    module its ``__name__`` names, and the modeling module's attributes are not the copy's globals
    (transformers 5.25+ with HF ``kernels`` replaces some by wrappers, and Dynamo then fails to
    build the guard).
    """
    fn = innermost(fn)
    name = f"corept._forward_clone{next(_counter)}"
    module = types.ModuleType(name, f"globals of a corept-patched copy of {fn.__module__}.{fn.__qualname__}")
    scope = module.__dict__
    scope.update({k: v for k, v in fn.__globals__.items() if k not in ("__name__", "__doc__", "__spec__",
                                                                         "__loader__", "__package__")})
    scope.update(overrides)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    clone.__qualname__ = fn.__qualname__
    clone.__doc__ = fn.__doc__
    sys.modules[name] = module
    weakref.finalize(clone, sys.modules.pop, name, None)
    return clone
