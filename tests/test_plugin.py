"""The plugin is installed under vLLM's entry point, loads in every vLLM process, and only once."""

from __future__ import annotations

import importlib.metadata
import logging
import re

from vllm_mtp_gemma4 import plugin

LOADED = re.compile(r"vllm-mtp-gemma4 \S+ plugin loaded \(pid (\d+)\)")


def test_entry_point_points_at_register():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == plugin.PLUGIN_NAME]
    assert len(ours) == 1
    assert ours[0].load() is plugin.register


def test_register_is_idempotent():
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect()
    logging.getLogger(f"vllm.{plugin.__name__}").addHandler(handler)
    try:
        plugin._registered_pid = None
        plugin.register()
        plugin.register()
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # vLLM's own loader, which may run again in the same process
    finally:
        logging.getLogger(f"vllm.{plugin.__name__}").removeHandler(handler)
    assert plugin.is_registered()
    assert sum("plugin loaded" in r.getMessage() for r in records) == 1


def test_vllm_loads_plugin_in_each_process(plain_greedy, upstream_mtp_greedy):
    pids = LOADED.findall(plain_greedy.log)
    assert len(pids) == len(set(pids)), "loaded twice in one process"
    assert len(set(pids)) >= 2, "expected the front end and the engine core to load the plugin"
    assert not LOADED.search(upstream_mtp_greedy.log), "VLLM_PLUGINS did not turn the plugin off"
