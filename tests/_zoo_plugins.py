"""Until the editable plugins package is re-installed with the new entry points (plugins/pyproject.toml), the
TransMIL/CLAM heads are registered for the tests through an extra-modules plugin manager."""

from __future__ import annotations

import contextlib

from gigapath_core import plugins


@contextlib.contextmanager
def new_heads_registered():
    if "transmil" in plugins.get_plugin_manager().plugins["task_head"]:
        yield
        return
    import gigapath_core.api as api
    from gigapath_plugins.task_heads import clam, transmil

    manager = plugins.PluginManager(extra_modules=[transmil, clam])
    saved = (plugins.get_plugin_manager, api.get_plugin_manager)
    plugins.get_plugin_manager = api.get_plugin_manager = lambda: manager
    try:
        yield
    finally:
        plugins.get_plugin_manager, api.get_plugin_manager = saved
