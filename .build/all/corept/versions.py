"""Installed-version checks against the ranges plugins and the core declare."""
from __future__ import annotations

import functools

import importlib_metadata
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

# The stacks corept is tested on: CPU (transformers 5.24) and the H200 image (5.17).
SUPPORTED_TRANSFORMERS = ">=5.17,<6"
SUPPORTED_TORCH = ">=2.11"
SUPPORTED_TRITON = ">=3.6"


@functools.lru_cache(maxsize=None)
def installed_version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def in_range(version: str | None, spec: str) -> tuple[bool, str]:
    """Whether ``version`` satisfies PEP 440 ``spec``; ``(ok, reason)``."""
    if version is None:
        return False, "not installed"
    try:
        ok = Version(version.split("+")[0]) in SpecifierSet(spec, prereleases=True)
    except InvalidSpecifier:
        return False, f"invalid version range {spec!r}"
    return ok, "" if ok else f"installed {version} is outside the declared range {spec!r}"


def transformers_supported(spec: str) -> tuple[bool, str]:
    """Whether the installed transformers satisfies ``spec``; ``(ok, reason)``."""
    ok, reason = in_range(installed_version("transformers"), spec)
    return ok, "" if ok else f"transformers {reason}"
