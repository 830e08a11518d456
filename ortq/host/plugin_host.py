"""The plugin host: one :class:`PluginHost` owns one plugin manager and the registries built from it.

The stages below the facade need only this (look up an op quantizer, a calibrator, a backend, a metric),
so it sits low; :class:`ortq.Toolkit` adds the pipeline's entry points on top. There is no module-level
manager: two hosts in one process (two vendor SDKs, two tests, two threads)
never see each other's plugins. This is pytest's ``Config`` idea applied to a library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

import pluggy

from ortq.core import hookspecs
from ortq.core.errors import ConfigError, PluginError
from ortq.host.registry import Registry

if TYPE_CHECKING:
    from ortq.core.backend import Backend
    from ortq.core.calibrator import Calibrator, Statistic
    from ortq.core.metric import Metric
    from ortq.core.op_quantizer import OpQuantizer

__all__ = ["PluginHost", "PluginInfo", "BUILTIN_PLUGINS", "ENTRY_POINT_GROUP"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ortq"

#: Built-in plugins, registered exactly as third-party ones are.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "ortq.plugins.ops.conv",
    "ortq.plugins.ops.matmul",
    "ortq.plugins.ops.elementwise",
    "ortq.plugins.ops.activations",
    "ortq.plugins.ops.pooling",
    "ortq.plugins.ops.data_movement",
    "ortq.plugins.ops.softmax",
    "ortq.plugins.calibrators.minmax",
    "ortq.plugins.calibrators.percentile",
    "ortq.plugins.calibrators.entropy",
    "ortq.plugins.calibrators.mse",
    "ortq.plugins.calibrators.auto",
    "ortq.plugins.backends.cpu",
    "ortq.plugins.backends.esp32",
    "ortq.plugins.backends.tensorrt",
    "ortq.plugins.metrics.agreement",
    "ortq.plugins.metrics.labels",
    "ortq.plugins.metrics.similarity",
)

OnError = Literal["raise", "skip"]

_REGISTRATION_HOOKS = {
    "ortq_register_op_quantizers": "op_quantizers",
    "ortq_register_calibrators": "calibrators",
    "ortq_register_backends": "backends",
    "ortq_register_metrics": "metrics",
}


@dataclass
class PluginInfo:
    """What ``ortq plugins`` shows about one loaded plugin."""

    name: str
    source: str  # "builtin", "entry point <dist> <version>", or "explicit"
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class PluginHost:
    """Plugins and what they registered; :class:`ortq.Toolkit` is this plus the pipeline's entry points.

    ``plugins`` are extra plugin objects (modules or instances with ``@ortq.hookimpl`` methods).
    ``autoload`` loads third-party plugins from the ``ortq`` entry-point group; ``builtins=False`` starts
    from an empty toolkit (useful to test a plugin alone). ``on_plugin_error="skip"`` logs a broken plugin
    and goes on instead of raising (the ``ortq`` command does this, so one broken package cannot take every
    command down); :meth:`broken_plugins` lists what was skipped. ``disabled`` names entry points (or
    built-in plugin modules) not to load at all, as pytest's ``-p no:NAME``.
    """

    def __init__(
        self,
        plugins: Iterable[object] = (),
        *,
        autoload: bool = True,
        builtins: bool = True,
        only_entry_points: Iterable[str] | None = None,
        on_plugin_error: OnError = "raise",
        disabled: Iterable[str] = (),
    ) -> None:
        self.on_plugin_error: OnError = on_plugin_error
        self.disabled = frozenset(disabled)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.op_quantizers: Registry[type[OpQuantizer]] = Registry("op quantizer")
        self.calibrators: Registry[type[Calibrator]] = Registry("calibrator")
        self.backends: Registry[type[Backend]] = Registry("backend")
        self.metrics: Registry[type[Metric]] = Registry("metric")
        self.plugin_info: dict[str, PluginInfo] = {}
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                if module_name in self.disabled:
                    continue
                self._guarded(module_name, "builtin", lambda m=module_name: importlib.import_module(m))
        if autoload:
            self._load_entry_points(set(only_entry_points) if only_entry_points is not None else None)
        for plugin in plugins:
            self.register(plugin)

    # -- plugin loading -------------------------------------------------------------------------
    def register(self, plugin: object, name: str | None = None, *, source: str = "explicit") -> str | None:
        """Register one plugin object and add what it registers; returns its name (None if skipped)."""
        return self._guarded(name or _plugin_name(plugin), source, lambda: plugin)

    def _guarded(self, name: str, source: str, load: Callable[[], object]) -> str | None:
        """Load, register and collect one plugin; any failure is reported with its name and source."""
        info = PluginInfo(name, source)
        prefix = f"plugin {name!r} ({source})"
        try:
            plugin = load()
        except Exception as exc:
            return self._plugin_failed(info, f"{prefix} failed to load: {exc!r}", exc)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return self._plugin_failed(info, f"{prefix} is not a valid ortq plugin: {exc}", exc)
        info.hooks = sorted(_hook_names(self.pm, plugin))
        try:
            self._collect(plugin, info, prefix)
        except Exception as exc:
            for registry in (self.op_quantizers, self.calibrators, self.backends, self.metrics):
                registry.remove_plugin(name)
            self.pm.unregister(plugin)
            return self._plugin_failed(info, str(exc) if isinstance(exc, PluginError) else f"{prefix}: {exc!r}", exc)
        self.plugin_info[name] = info
        return name

    def _plugin_failed(self, info: PluginInfo, message: str, exc: Exception) -> None:
        if self.on_plugin_error == "raise":
            raise PluginError(message) from exc
        log.warning("skipping broken plugin: %s", message)
        info.error = message
        self.plugin_info[info.name] = info
        return None

    def _collect(self, plugin: object, info: PluginInfo, prefix: str) -> None:
        """Call this plugin's registration hooks one by one, attributing every entry to it."""
        for hook_name, attr in _REGISTRATION_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                registry = getattr(self, attr)
                names: list[str] = []

                def register(thing: Any, *, replace: bool = False, _r=registry, _n=names) -> None:
                    for key in _registry_keys(thing, _r.kind):
                        _r.add(key, thing, plugin=info.name, replace=replace)
                        _n.append(key)

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"{prefix} raised in {hook_name}: {exc!r}") from exc
                if names:
                    info.registered.setdefault(attr, []).extend(names)

    def _load_entry_points(self, only: set[str] | None) -> None:
        seen: set[str] = set()
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in seen:
                    continue
                if (only is not None and ep.name not in only) or ep.name in self.disabled:
                    continue
                seen.add(ep.name)
                dist_name = dist.metadata["name"] or "?"
                source = f"entry point {ep.value} from {dist_name} {dist.version}"
                self._guarded(ep.name, source, ep.load)

    def broken_plugins(self) -> list[PluginInfo]:
        """Plugins that failed to load or register and were skipped (``on_plugin_error="skip"``)."""
        return [info for info in self.plugin_info.values() if info.error]

    # -- lookups ---------------------------------------------------------------------------------
    def op_quantizer_for(self, op_type: str, domain: str = "") -> type[OpQuantizer] | None:
        return self.op_quantizers.find(_op_key(op_type, domain))

    def calibrator(self, name: str, **options: Any) -> Calibrator:
        cls = self.calibrators.get(_normalize(name))
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibrator {name!r}: bad options {sorted(options)}: {exc}") from None

    def backend(self, name: str, **options: Any) -> Backend:
        cls = self.backends.get(_normalize(name))
        valid = option_names(cls)
        unknown = sorted(set(options) - set(valid)) if valid is not None else []
        if unknown:  # before calling: Python's "__init__() got an unexpected keyword argument" says nothing useful
            listed = ", ".join(f"{k}={v}" for k, v in valid.items()) if valid else "none"
            raise ConfigError(f"backend {name!r} has no option {', '.join(map(repr, unknown))}; its options: {listed}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"backend {name!r}: bad options {sorted(options)}: {exc}") from None

    def metric(self, name: str, **options: Any) -> Metric:
        """A fresh :class:`ortq.Metric` by registered name; ``output=`` picks the model output it scores."""
        cls = self.metrics.get(_normalize(name))
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metric {name!r}: bad options {sorted(options)}: {exc}") from None

    def plugin_of(self, registry: Registry[Any], key: str) -> str:
        return registry.entry(key).plugin

    def statistic_types(self) -> list[type[Statistic]]:
        """Statistic classes that registered calibrators can reduce (what a saved state may contain)."""
        from ortq.core.calibrator import MinMaxStatistic

        types: dict[str, type[Statistic]] = {MinMaxStatistic.kind: MinMaxStatistic}
        for entry in self.calibrators:
            for stat_type in getattr(entry.value, "statistic_types", ()):
                types.setdefault(stat_type.kind, stat_type)
        return list(types.values())



def option_names(cls: type) -> dict[str, str] | None:
    """The keyword options a plugin class's constructor takes, with their defaults as text (``"8"``,
    ``"'auto'"``, ``"required"``); None when it takes ``**kwargs`` (any name may be valid)."""
    import inspect

    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {
        p.name: "required" if p.default is p.empty else repr(p.default)
        for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _normalize(name: str) -> str:
    return str(getattr(name, "name", name)).lower()


def _op_key(op_type: str, domain: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def _registry_keys(thing: Any, kind: str) -> list[str]:
    if kind == "op quantizer":
        op_types = getattr(thing, "op_types", None)
        if not op_types:
            raise PluginError(f"op quantizer {thing!r} declares no op_types")
        return [_op_key(op, getattr(thing, "domain", "")) for op in op_types]
    name = getattr(thing, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise PluginError(f"{kind} {thing!r} needs a lowercase string 'name' attribute")
    return [name]


def _plugin_name(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def _hook_names(pm: pluggy.PluginManager, plugin: object) -> Iterable[str]:
    for caller in pm.get_hookcallers(plugin) or []:
        yield caller.name
