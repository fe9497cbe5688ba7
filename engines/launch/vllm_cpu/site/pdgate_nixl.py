"""vLLM's NixlConnector for small CPU-only hosts; load it with
``"kv_connector": "NixlConnector", "kv_connector_module_path": "pdgate_nixl"`` and this
directory on ``PYTHONPATH`` (``pdgate engine vllm`` does both on CPU hosts).

Two changes, nothing else:

1. NIXL's progress thread is turned off. It busy-polls a whole core per engine, even idle;
   vLLM drives the transfers' progress from its own engine loop anyway.
2. The CPU affinity the engine was started with (``taskset -c N``) is put back after the
   connector is built: vLLM's NIXL worker pins the calling thread to the last core of its NUMA
   node, which with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is the model thread, so every engine on
   the host would end up sharing one core.
"""

from __future__ import annotations

import os
from typing import Any

import nixl._api as nixl_api
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlPullConnector

_original_config_init = nixl_api.nixl_agent_config.__init__


def _config_without_progress_thread(self: Any, *args: Any, enable_prog_thread: bool = False, **kwargs: Any) -> None:
    _original_config_init(self, *args, enable_prog_thread=enable_prog_thread, **kwargs)


nixl_api.nixl_agent_config.__init__ = _config_without_progress_thread


class NixlConnector(NixlPullConnector):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        affinity = os.sched_getaffinity(0)
        try:
            super().__init__(*args, **kwargs)
        finally:
            os.sched_setaffinity(0, affinity)
