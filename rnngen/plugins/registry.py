"""Plugins: packages that add CLI commands, logits processors, tokenizers, model sources
and inspection features to rnngen.

A plugin is a module (or object) named by an entry point in the group `rnngen`:

    [project.entry-points.rnngen]
    myplugin = "my_package.rnngen_plugin"

Its functions marked with `@rnngen.plugins.hookimpl` implement any of the hooks in
`HookSpecs` (rnngen.plugins.hookspecs). rnngen's own tokenizers, processors, sources
and features register through the same hooks (rnngen.plugins.builtins), so a
plugin's additions are first-class; the CLI adds its own commands, then asks the
plugins for theirs.

Only the edges consult the registry: the CLI and the server resolve model names,
tokenizer kinds, processors and features here and hand plain tables down
(`tokenizer_kinds()`, `processor_factories()`, `inspect_features()`), so loading a
model from Python (`RnnModel.load`) imports no plugin.

Loading is lazy and fault-tolerant:
- entry points are imported once per process, when something first asks the
  registry (the CLI at start-up, to list commands). Each table (tokenizers,
  processors, ...) is filled on first use. Keep a plugin module's imports light:
  import heavy libraries inside the functions that need them.
- a plugin that fails to import or whose hook raises is reported (one line on
  stderr, and `rnngen plugins`) and skipped; everything else keeps working.
- a name already taken (a command, tokenizer, ...) is reported and the later
  registration skipped: a plugin cannot silently replace a built-in.

`RNNGEN_PLUGINS=0` loads no entry points at all (built-ins only);
`RNNGEN_DISABLE_PLUGINS=a,b` skips the named ones.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from rnngen.decoding.processors import ProcessorFactory
from rnngen.errors import InvalidParameterError
from rnngen.model.tokenizers import TokenizerKind
from rnngen.plugins.hookspecs import HookSpecs

ENTRY_POINT_GROUP = "rnngen"
BUILTIN = "builtins"

@dataclass
class PluginInfo:
    """One plugin as `rnngen plugins` shows it."""

    name: str
    source: str  # "rnngen" for the built-ins, else the distribution (and version) providing it
    status: str = "loaded"  # loaded, failed, disabled
    errors: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)  # kind -> names it registered

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "status": self.status, "errors": self.errors,
                "provides": self.provides}


@dataclass(frozen=True)
class Registered:
    name: str
    value: Any  # the registered callable
    help: str
    plugin: str  # the plugin that registered it
    extra: dict = field(default_factory=dict)  # e.g. a tokenizer's from_text


class PluginRegistry:
    """The plugin manager plus the tables the hooks fill, each built on first use."""

    def __init__(self, load_entry_points: bool | None = None, report: Callable[[str], None] | None = None):
        self._pm = pluggy.PluginManager("rnngen")
        self._pm.add_hookspecs(HookSpecs)
        self._report = report if report is not None else _report_to_stderr
        self.plugins: dict[str, PluginInfo] = {}
        self._tables: dict[str, dict[str, Registered]] = {}
        self._lock = threading.RLock()

        import rnngen.plugins.builtins as builtins

        self._pm.register(builtins, name=BUILTIN)
        self.plugins[BUILTIN] = PluginInfo(BUILTIN, "rnngen")
        if load_entry_points is None:
            load_entry_points = os.environ.get("RNNGEN_PLUGINS", "1").strip().lower() not in ("0", "false", "no", "off")
        if load_entry_points:
            self._load_entry_points()

    # ------------------------------------------------------------------ loading

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        disabled = {n.strip() for n in os.environ.get("RNNGEN_DISABLE_PLUGINS", "").split(",") if n.strip()}
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else ep.value
            if ep.name in disabled:
                self.plugins.setdefault(ep.name, PluginInfo(ep.name, source, status="disabled"))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must never break rnngen
                plugin = exc
            self.add_plugin(plugin, ep.name, source)

    def add_plugin(self, plugin: Any, name: str, source: str) -> None:
        """Register a plugin object (a module or any object with hookimpls); an exception in
        its place is a plugin that failed to load. Tables already built are not refilled."""
        info = PluginInfo(name, source)
        if name in self.plugins:
            self._problem(info, f"the name {name!r} is already taken by another plugin")
            return
        self.plugins[name] = info
        if isinstance(plugin, BaseException):
            self._problem(info, f"import failed: {type(plugin).__name__}: {plugin}")
            return
        self._pm.register(plugin, name=name)

    def _problem(self, info: PluginInfo, message: str, failed: bool = True) -> None:
        """Record and report a problem once (the CLI may be built more than once in a process)."""
        if failed:
            info.status = "failed"
        if message not in info.errors:
            info.errors.append(message)
            self._report(f"rnngen: plugin {info.name!r} ({info.source}): {message}; skipped")

    def _call(self, hook: str, make_register: Callable[[str], Any]) -> None:
        """Call one hook on every plugin separately, so that one failing does not stop the others."""
        for impl in getattr(self._pm.hook, hook).get_hookimpls():  # in registration order: built-ins first
            info = self.plugins[impl.plugin_name]
            try:
                impl.function(make_register(impl.plugin_name))
            except Exception as exc:
                self._problem(info, f"{hook} raised {type(exc).__name__}: {exc}")

    def _table(self, kind: str, hook: str) -> dict[str, Registered]:
        with self._lock:
            if kind not in self._tables:
                table: dict[str, Registered] = {}

                def make_register(plugin: str):
                    def register(name: str, value: Any, help: str = "", **extra: Any) -> None:
                        if not isinstance(name, str) or not name:
                            raise InvalidParameterError(f"{kind} name {name!r} is not a non-empty string")
                        if name in table:
                            self._problem(self.plugins[plugin], f"{kind} {name!r} is already provided by "
                                          f"{table[name].plugin}", failed=False)
                            return
                        if not callable(value):
                            raise InvalidParameterError(f"{kind} {name!r}: {value!r} is not callable")
                        table[name] = Registered(name, value, help, plugin, extra)
                        self.plugins[plugin].provides.setdefault(kind, []).append(name)

                    return register

                self._call(hook, make_register)
                self._tables[kind] = table
            return self._tables[kind]

    # ------------------------------------------------------------------ the tables

    def tokenizers(self) -> dict[str, Registered]:
        return self._table("tokenizer", "register_tokenizers")

    def logits_processors(self) -> dict[str, Registered]:
        return self._table("logits processor", "register_logits_processors")

    def model_sources(self) -> dict[str, Registered]:
        return self._table("model source", "register_model_sources")

    def inspect_features(self) -> dict[str, Registered]:
        return self._table("inspect feature", "register_inspect_features")

    def load_all(self) -> None:
        """Fill every table (for `rnngen plugins`)."""
        self.tokenizers(), self.logits_processors(), self.model_sources(), self.inspect_features()

    def add_commands(self, app: Any) -> None:
        """Let every plugin add its commands; a plugin's command whose name is taken is dropped."""
        # The CLI's own commands are on the app already: a plugin cannot take their names.
        taken: dict[str, str] = {(c.name or c.callback.__name__.replace("_", "-")): "rnngen" for c in app.registered_commands}
        for info in self.plugins.values():
            info.provides.pop("command", None)
        for impl in self._pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            before = len(app.registered_commands), len(app.registered_groups)
            try:
                impl.function(app)
            except Exception as exc:
                del app.registered_commands[before[0]:], app.registered_groups[before[1]:]
                self._problem(info, f"register_commands raised {type(exc).__name__}: {exc}")
                continue
            kept_commands = app.registered_commands[: before[0]]
            for command in app.registered_commands[before[0]:]:
                name = command.name or command.callback.__name__.replace("_", "-")
                if name in taken:
                    self._problem(info, f"command {name!r} is already provided by {taken[name]}", failed=False)
                    continue
                taken[name] = impl.plugin_name
                info.provides.setdefault("command", []).append(name)
                kept_commands.append(command)
            app.registered_commands[:] = kept_commands
            for group in app.registered_groups[before[1]:]:
                name = group.name or group.typer_instance.info.name
                taken[name] = impl.plugin_name
                info.provides.setdefault("command", []).append(name)


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def registry() -> PluginRegistry:
    """The process's plugin registry, created (and entry points loaded) on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
        return _registry


def reset_registry() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in a running process)."""
    global _registry
    with _registry_lock:
        _registry = None


def _report_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _names(table: dict[str, Registered]) -> str:
    return ", ".join(sorted(table)) or "none"


# ---------------------------------------------------------------------- tables handed down by the edges
# The CLI and the server consult the registry and pass these plain tables to the model,
# decoding and inspect layers, which never import this package.


def tokenizer_kinds() -> dict[str, TokenizerKind]:
    """Every registered tokenizer kind (built-ins and plugins), for RnnModel.load and training."""
    return {name: TokenizerKind(e.value, e.extra.get("from_text")) for name, e in registry().tokenizers().items()}


def processor_factories() -> dict[str, ProcessorFactory]:
    """Every registered logits processor, name -> factory, for Generation and the server."""
    return {name: e.value for name, e in registry().logits_processors().items()}


def inspect_features() -> dict[str, tuple[Callable, str, str]]:
    """Every registered inspect feature, name -> (compute, help, plugin), for rnngen.inspect.recording.analyse."""
    return {name: (e.value, e.help, e.plugin) for name, e in registry().inspect_features().items()}


def resolve_model(spec: str | os.PathLike) -> str:
    """A model argument -> a local file path.

    `SCHEME:REST` goes to the model source registered for SCHEME (one-letter schemes are
    Windows drive letters, not sources); an existing path is itself; a bare name such as
    `lstm` is looked up by the built-in `name` source (RNNGEN_MODEL_DIRS, then ./exported).
    """
    text = os.fspath(spec)
    if os.path.exists(text):
        return text
    scheme, sep, rest = text.partition(":")
    if sep and len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:
        table = registry().model_sources()
        if scheme not in table:
            raise InvalidParameterError(f"model: {text!r}: no model source {scheme!r}; known: {_names(table)}")
        return os.fspath(table[scheme].value(rest))
    if os.sep not in text and "/" not in text and not text.endswith(".onnx"):
        return os.fspath(registry().model_sources()["name"].value(text))
    return text
