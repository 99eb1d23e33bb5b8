"""Plugin manager: loads plugin modules from the ``gigapath`` entry-point group.

Bundled plugins (package ``gigapath_plugins``) are loaded exactly like third-party ones. A plugin module
that fails to import, returns a class that is not a subclass of its kind's base, or reuses a name already
taken is skipped with a :class:`PluginWarning` naming the distribution; the others still load.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import pluggy

from .errors import PluginNotFoundError
from .hookspecs import KIND_HOOKS, PROJECT, GigapathSpecs
from .kinds import BASES

ENTRY_POINT_GROUP = "gigapath"
#: the distribution shipped with gigapath; loaded first, so its names win over a clashing third-party plugin
BUNDLED_DISTRIBUTION = "gigapath-plugins"


class PluginWarning(UserWarning):
    """A plugin package could not be loaded or registered a conflicting name."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    module: str
    package: str  # distribution that provides it (e.g. "gigapath-plugins")
    description: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
            "package": self.package,
            "description": self.description,
        }


def _entry_points() -> list[md.EntryPoint]:
    def key(ep: md.EntryPoint) -> tuple:
        dist = ep.dist.name if ep.dist else ""
        return (dist != BUNDLED_DISTRIBUTION, dist, ep.name)

    return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=key)


class PluginManager:
    """Loads entry points once and indexes plugin classes by (kind, name)."""

    def __init__(self, extra_modules: list[ModuleType] = ()) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(GigapathSpecs)
        self.plugins: dict[str, dict[str, PluginInfo]] = {k: {} for k in KIND_HOOKS}
        self._sources: dict[int, str] = {}  # id(module) -> distribution name
        self._order: dict[int, int] = {}  # id(module) -> registration order
        for ep in _entry_points():
            package = ep.dist.name if ep.dist else "?"
            try:
                module = ep.load()
                self.pm.register(module, name=f"{package}:{ep.name}")
            except Exception as err:  # a broken third-party package must not break the others
                warnings.warn(
                    f"gigapath plugin {ep.name!r} from package {package!r} failed to load "
                    f"({ep.value}): {type(err).__name__}: {err}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            self._sources[id(module)] = package
            self._order[id(module)] = len(self._order)
        for module in extra_modules:
            self.pm.register(module)
            self._sources[id(module)] = getattr(module, "__name__", "?")
            self._order[id(module)] = len(self._order)
        self._index()

    def _index(self) -> None:
        for kind, hook_name in KIND_HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in sorted(hook.get_hookimpls(), key=lambda i: self._order.get(id(i.plugin), 1 << 30)):
                package = self._sources.get(id(impl.plugin), impl.plugin_name)
                try:
                    classes = impl.function() or []
                except Exception as err:
                    warnings.warn(
                        f"gigapath plugin module {impl.plugin_name!r} (package {package!r}) raised in "
                        f"{hook_name}: {type(err).__name__}: {err}",
                        PluginWarning,
                        stacklevel=3,
                    )
                    continue
                for cls in classes:
                    self._add(kind, cls, package)

    def _add(self, kind: str, cls: type, package: str) -> None:
        base = BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)) or not getattr(cls, "name", ""):
            warnings.warn(
                f"package {package!r} registered {cls!r} as a {kind} plugin, but it is not a named "
                f"subclass of {base.__module__}.{base.__qualname__}; ignored",
                PluginWarning,
                stacklevel=4,
            )
            return
        existing = self.plugins[kind].get(cls.name)
        if existing is not None and existing.cls is not cls:
            warnings.warn(
                f"duplicate {kind} plugin name {cls.name!r}: package {package!r} ({cls.__module__}) "
                f"conflicts with package {existing.package!r} ({existing.module}); keeping the first",
                PluginWarning,
                stacklevel=4,
            )
            return
        self.plugins[kind][cls.name] = PluginInfo(kind, cls.name, cls, cls.__module__, package, cls.describe())

    def get(self, kind: str, name: str) -> PluginInfo:
        check_kind(kind)
        try:
            return self.plugins[kind][name]
        except KeyError:
            raise PluginNotFoundError(
                kind, f"unknown plugin {name!r}; valid choices: {', '.join(sorted(self.plugins[kind])) or '(none installed)'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        check_kind(kind)
        return sorted(self.plugins[kind])


def check_kind(kind: str) -> None:
    if kind not in KIND_HOOKS:
        raise PluginNotFoundError("kind", f"unknown plugin kind {kind!r}; valid choices: {', '.join(KIND_HOOKS)}")


@lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (entry points are read once; call ``reset()`` after installs)."""
    return PluginManager()


def reset() -> None:
    """Forget loaded plugins so the next call re-reads entry points (after installing a package)."""
    get_plugin_manager.cache_clear()
