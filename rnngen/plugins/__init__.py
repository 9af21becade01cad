"""Plugins: hook specs, the registry that loads entry points, and rnngen's built-ins.

See rnngen.plugins.registry for how plugins are found, loaded and reported. A
plugin module marks its hook functions with `@rnngen.plugins.hookimpl`.
"""

from rnngen.plugins.hookspecs import HookSpecs, hookimpl, hookspec
from rnngen.plugins.registry import ENTRY_POINT_GROUP, PluginInfo, PluginRegistry, Registered, inspect_features, processor_factories, registry, reset_registry, resolve_model, tokenizer_kinds

__all__ = ["ENTRY_POINT_GROUP", "HookSpecs", "PluginInfo", "PluginRegistry", "Registered", "hookimpl", "hookspec",
           "inspect_features", "processor_factories", "registry", "reset_registry", "resolve_model", "tokenizer_kinds"]
