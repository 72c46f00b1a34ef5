"""The plugin manager: built-in and entry-point plugins, allow/deny lists, conflicts, tracing.

Plugins load lazily on first use and only once, in one place (:meth:`CoreptPluginManager._load`):
first corept's built-in plugins (:data:`BUILTIN_PLUGINS`: modules of the ``corept`` distribution,
registered exactly like third-party ones), then the ``corept`` entry-point group
(importlib-metadata). Environment variables:

* ``COREPT_PLUGINS=a,b`` loads only those entry-point plugins (entry-point or distribution names);
  an empty value loads none. Built-ins always load unless disabled.
* ``COREPT_DISABLE_PLUGINS=a,b`` skips those (built-ins included, e.g. ``corept.components``: the
  models then keep transformers' forwards wherever no plugin of their own answers).
* ``COREPT_TRACE=1`` logs every hook call on the ``corept.trace`` logger.

Every plugin is isolated: one that fails in any way (its import raises, even ``SystemExit``; it
implements a hook that does not exist; its registration returns something else than
``Architecture`` objects) is skipped with the reason, which ``corept plugins`` and ``corept doctor``
show, and the others keep working. Two distributions providing one plugin name are a conflict:
neither loads, and both are shown with the reason. Names in ``COREPT_PLUGINS`` /
``COREPT_DISABLE_PLUGINS`` that match no plugin are warned about. A Ctrl-C during discovery (but
outside a plugin's import) leaves nothing half-loaded: the next call discovers again. (``register_plugin``, called in code, raises
instead: there the caller asked for that one plugin.)
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import importlib

import importlib_metadata
import pluggy

from corept.errors import PluginConflictError, PluginLoadError
from corept.registry import hookspecs
from corept.registry.declarations import Architecture
from corept.versions import transformers_supported

logger = logging.getLogger("corept")
trace_logger = logging.getLogger("corept.trace")

ENTRY_POINT_GROUP = "corept"
#: corept's own plugins, ``{plugin name: module}``: loaded first, like any entry-point plugin.
BUILTIN_PLUGINS = {"corept.components": "corept.components.plugin"}


@dataclass
class PluginRecord:
    """What corept knows about one plugin, loaded or not.

    :param name: entry-point name (or the name given to :func:`register_plugin`).
    :param distribution: the installed distribution that ships it (``None`` if registered in code).
    :param version: that distribution's version.
    :param loaded: the plugin imported and registered.
    :param error: why it did not load (import error, disabled by env var, ...).
    :param architectures: what it declared.
    :param hooks: names of the hooks it implements.
    :param builtin: one of corept's own plugins (:data:`BUILTIN_PLUGINS`).
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    loaded: bool = False
    error: str | None = None
    architectures: list[Architecture] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    builtin: bool = False
    plugin: Any = None

    def to_dict(self) -> dict:
        ranges = sorted({a.transformers for a in self.architectures})
        return {
            "name": self.name,
            "builtin": self.builtin,
            "distribution": self.distribution,
            "version": self.version,
            "loaded": self.loaded,
            "error": self.error,
            "model_types": [a.model_type for a in self.architectures],
            "aliases": dict(sorted((alias, target) for a in self.architectures for alias, target in a.aliases.items())),
            "models": sorted({m.repo_id for a in self.architectures for m in a.models}),
            "hooks": self.hooks,
            "transformers": ranges[0] if len(ranges) == 1 else ranges,
            "transformers_supported": {a.model_type: transformers_supported(a.transformers)[0]
                                       for a in self.architectures},
        }


def _installed(dist: str) -> bool:
    try:
        importlib_metadata.distribution(dist)
    except importlib_metadata.PackageNotFoundError:
        return False
    return True


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class CoreptPluginManager:
    """Owns the pluggy manager and the architecture registry built from the plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._claims: dict[str, list[tuple[Architecture, PluginRecord]]] = {}
        self.problems: list[str] = []  # environment problems found while loading (doctor shows them)
        self._loaded = False
        self._lock = threading.RLock()
        if os.environ.get("COREPT_TRACE", "") not in ("", "0"):
            self.pm.add_hookcall_monitoring(self._trace_before, self._trace_after)

    # -- tracing ---------------------------------------------------------------------------
    @staticmethod
    def _trace_before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
        shown = {k: type(v).__name__ for k, v in kwargs.items()}
        trace_logger.info("hook %s(%s) -> %d impl(s): %s", hook_name, shown, len(hook_impls),
                          [i.plugin_name for i in hook_impls])

    @staticmethod
    def _trace_after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
        try:
            result = outcome.get_result()
        except BaseException as exc:  # noqa: BLE001 - only logged, pluggy re-raises it
            trace_logger.info("hook %s raised %r", hook_name, exc)
            return
        trace_logger.info("hook %s returned %s", hook_name, type(result).__name__)

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> "CoreptPluginManager":
        """Discover and load plugins once (idempotent, thread-safe); an interrupted discovery
        (Ctrl-C) leaves the manager empty, to be discovered again by the next call."""
        with self._lock:
            if not self._loaded:
                self._loaded = True
                try:
                    self._load()
                except BaseException:
                    self._forget()
                    raise
        return self

    def _forget(self) -> None:
        for rec in self.records.values():
            if rec.plugin is not None and self.pm.is_registered(rec.plugin):
                self.pm.unregister(rec.plugin)
        self.records.clear()
        self._claims.clear()
        self.problems = []
        self._loaded = False

    def _load(self) -> None:
        """Built-in plugins, then entry points: the one place plugins are loaded."""
        deny = _env_list("COREPT_DISABLE_PLUGINS") or set()
        version = importlib_metadata.version("corept") if _installed("corept") else None
        for name, module in BUILTIN_PLUGINS.items():
            rec = PluginRecord(name=name, distribution="corept", version=version, builtin=True)
            self.records[name] = rec
            if name in deny:
                rec.error = "disabled by COREPT_DISABLE_PLUGINS"
                continue
            self._isolated(rec, lambda: importlib.import_module(module))
        self._load_entry_points(deny)

    def _load_entry_points(self, deny: set[str]) -> None:
        only = _env_list("COREPT_PLUGINS")
        eps = list(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP))
        providers: dict[str, list] = {}
        for ep in eps:
            providers.setdefault(ep.name, []).append(ep)
        for name, group in providers.items():
            dists = [ep.dist.name if ep.dist is not None else None for ep in group]
            if len(group) > 1 or name in BUILTIN_PLUGINS:
                why = (f"plugin name conflict: {name!r} is corept's built-in plugin; the entry point of "
                       f"{', '.join(map(str, dists))} is not loaded: rename it" if name in BUILTIN_PLUGINS else
                       f"plugin name conflict: {name!r} is provided by {', '.join(map(str, dists))}; none of "
                       f"them loads: uninstall all but one")
                for ep, dist in zip(group, dists):
                    key = name if name not in self.records else f"{name} [{dist}]"
                    self.records[key] = PluginRecord(name=name, distribution=dist, error=why,
                                                     version=ep.dist.version if ep.dist is not None else None)
                self.problems.append(why)
                logger.warning("corept: %s", why)
                continue
            ep, dist = group[0], dists[0]
            rec = PluginRecord(name=ep.name, distribution=dist, version=ep.dist.version if ep.dist is not None else None)
            self.records[ep.name] = rec
            names = {ep.name, dist}
            if only is not None and not (names & only):
                rec.error = "not listed in COREPT_PLUGINS"
            elif names & deny:
                rec.error = "disabled by COREPT_DISABLE_PLUGINS"
            else:
                self._isolated(rec, ep.load)
        self._unmatched(only, deny, eps)

    def _unmatched(self, only: set[str] | None, deny: set[str], eps: list) -> None:
        known = set(BUILTIN_PLUGINS) | {ep.name for ep in eps} | {ep.dist.name for ep in eps if ep.dist is not None}
        for var, names in (("COREPT_PLUGINS", only or set()), ("COREPT_DISABLE_PLUGINS", deny)):
            unknown = sorted(names - known)
            if unknown:
                why = (f"{var} names {unknown}, which no installed plugin is called (plugins: "
                       f"{sorted(n for n in known if n)}): check the spelling")
                self.problems.append(why)
                logger.warning("corept: %s", why)

    def _isolated(self, rec: PluginRecord, load) -> None:
        """Import and register one plugin; any failure (``SystemExit`` or ``KeyboardInterrupt`` from
        its import included) is its reason to be skipped, never the others', nor a later call's."""
        try:
            self._register(load(), rec)
        except BaseException as exc:  # noqa: BLE001 - a broken plugin must not break the others
            stage = "failed to load" if isinstance(exc, PluginLoadError) else "failed to import"
            rec.error = f"{stage}: {type(exc).__name__}: {exc}"
            logger.warning("corept plugin %r from distribution %s %s (%s: %s); it is skipped and the other "
                           "plugins keep working. Fix or uninstall it, or set COREPT_DISABLE_PLUGINS=%s.",
                           rec.name, rec.distribution, stage, type(exc).__name__, exc, rec.name)

    def register_plugin(self, plugin: Any, name: str, *, distribution: str | None = None) -> PluginRecord:
        """Register a plugin object in code (tests, notebooks, in-tree experiments)."""
        with self._lock:
            self.ensure_loaded()
            if name in self.records and self.records[name].loaded:
                raise PluginLoadError(f"a corept plugin named {name!r} is already registered")
            rec = PluginRecord(name=name, distribution=distribution)
            self.records[name] = rec
            self._register(plugin, rec)
            return rec

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and its architecture claims."""
        with self._lock:
            rec = self.records.pop(name, None)
            if rec is None:
                return
            if rec.plugin is not None and self.pm.is_registered(rec.plugin):
                self.pm.unregister(rec.plugin)
            for model_type, claims in list(self._claims.items()):
                claims[:] = [c for c in claims if c[1] is not rec]
                if not claims:  # nobody claims it any more: model_types() must not list it
                    del self._claims[model_type]

    def _register(self, plugin: Any, rec: PluginRecord) -> None:
        self.pm.register(plugin, name=rec.name)
        rec.plugin = plugin
        try:
            self._check_pending(rec)
            archs = self._call_registration(plugin)
        except BaseException:
            self.pm.unregister(plugin)
            rec.plugin = None
            raise
        rec.loaded = True
        rec.architectures = archs
        rec.hooks = sorted(impl_name for impl_name in self._impl_names(plugin))
        for arch in archs:
            self._claims.setdefault(arch.model_type, []).append((arch, rec))

    def _impl_names(self, plugin: Any) -> list[str]:
        return [hc.name for hc in self.pm.get_hookcallers(plugin) or []]

    def _check_pending(self, rec: PluginRecord) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(
                f"corept plugin {rec.name!r} (distribution {rec.distribution}) implements a hook "
                f"corept does not define: {exc}. Known hooks: {sorted(hookspecs.ALL_HOOKS)}. "
                f"Fix the name, or set "
                f"COREPT_DISABLE_PLUGINS={rec.name}.") from exc

    def _call_registration(self, plugin: Any) -> list[Architecture]:
        impl = getattr(plugin, "corept_register_architectures", None)
        if impl is None:
            return []
        try:
            archs = list(impl() or [])
        except Exception as exc:
            raise PluginLoadError(f"corept_register_architectures raised {type(exc).__name__}: {exc}") from exc
        for a in archs:
            if not isinstance(a, Architecture):
                raise PluginLoadError(f"corept_register_architectures must return Architecture objects, got {a!r}")
        return archs

    # -- queries ---------------------------------------------------------------------------
    def architecture_for(self, model_type: str) -> tuple[Architecture, PluginRecord] | None:
        """The declaration owning ``model_type`` and its plugin, or ``None`` if nobody claims it.

        :raises PluginConflictError: two plugins claim it with the same priority.
        """
        self.ensure_loaded()
        claims = self._claims.get(model_type, [])
        if not claims:
            return None
        supported = [(a, r) for a, r in claims if transformers_supported(a.transformers)[0]]
        claims = supported or claims  # an out-of-range claim never blocks an in-range one
        top = max(a.priority for a, _ in claims)
        best = [(a, r) for a, r in claims if a.priority == top]
        if len(best) > 1:
            who = ", ".join(f"plugin {r.name!r} (distribution {r.distribution})" for _, r in best)
            raise PluginConflictError(
                f"model_type {model_type!r} is claimed by {who} with equal priority {top}. Disable "
                f"one with COREPT_DISABLE_PLUGINS={best[-1][1].name} (or uninstall it), or give one "
                f"Architecture a higher `priority`.")
        return best[0]

    def alias_target(self, name: str) -> tuple[str, PluginRecord] | None:
        """If a loaded plugin declares ``name`` as an alias, the repo id/path it stands for."""
        for arch, rec in self.declarations():
            for alias, target in arch.aliases.items():
                if alias.lower() == name.lower():
                    return target, rec
        return None

    def declarations(self) -> list[tuple[Architecture, PluginRecord]]:
        """Every architecture of every loaded plugin, with its plugin, in load order."""
        self.ensure_loaded()
        return [(arch, rec) for rec in self.records.values() if rec.loaded for arch in rec.architectures]

    def model_types(self) -> list[str]:
        self.ensure_loaded()
        return sorted(self._claims)

    @property
    def hook(self):
        self.ensure_loaded()
        return self.pm.hook


_manager: CoreptPluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> CoreptPluginManager:
    """The process-wide plugin manager, loading plugins on first call."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = CoreptPluginManager()
        manager = _manager
    try:
        return manager.ensure_loaded()
    except BaseException:
        # interrupted mid-discovery: forget the manager so the next call discovers again
        with _manager_lock:
            if _manager is manager:
                _manager = None
        raise


def reset_plugin_manager() -> None:
    """Forget loaded plugins; the next :func:`get_plugin_manager` rediscovers (env vars re-read)."""
    global _manager
    with _manager_lock:
        _manager = None


def register_plugin(plugin: Any, name: str) -> PluginRecord:
    """Register a plugin object in code; see :meth:`CoreptPluginManager.register_plugin`."""
    return get_plugin_manager().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    get_plugin_manager().unregister_plugin(name)
