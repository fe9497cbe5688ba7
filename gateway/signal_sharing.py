"""What one replica learns about the engines that every replica should act on at once.

* **Dead instances**: when a replica opens an instance's circuit (failed requests or health
  checks), it says so on ``pdgate.circuit``; every other replica opens its own circuit for that
  instance for a cooldown, so all avoid it within the message's delay (milliseconds), not after
  each found out by failing. Each closes it again by its own health checks, as usual.
* **Routing decisions for the approximate prefix index** (instances without KV events): the
  prompt blocks a replica sent to an instance are published on ``pdgate.prefixes`` (gathered
  for ``FLUSH_S`` into one message), and every replica records them, so replicas agree on who holds which
  prefix. The exact index (KV events) is not shared: every replica subscribes to the engines.

Messages are sent from a background task, never on the request path; while NATS is away they
are dropped (a circuit is found open again by the replica's own failures; a prefix is
recorded again with the next request that sends it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.sharing import SharedState

log = logging.getLogger("pdgate.sharing")

CIRCUIT_SUBJECT = "pdgate.circuit"
PREFIX_SUBJECT = "pdgate.prefixes"
FLUSH_S = 0.05
MAX_PENDING_PREFIXES = 10_000  # recordings kept while NATS is slow; the oldest go first


class SignalSharing:
    def __init__(self, shared: SharedState, cluster: Cluster) -> None:
        self.shared = shared
        self.cluster = cluster
        self._circuits: list[dict[str, Any]] = []
        self._prefixes: list[tuple[str, list[int]]] = []
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks()
        shared.subscribe(CIRCUIT_SUBJECT, self._on_circuit)
        shared.subscribe(PREFIX_SUBJECT, self._on_prefixes)
        cluster.on_circuit_open = self._circuit_opened
        cluster.on_prompt_recorded = self._prompt_recorded

    def start(self) -> None:
        self._tasks.spawn(self._send_loop(), "signal-sharing")

    async def close(self) -> None:
        self.cluster.on_circuit_open = None
        self.cluster.on_prompt_recorded = None
        await self._tasks.close()

    # ------------------------------------------------------------- outgoing
    def _circuit_opened(self, instance_id: str, reason: str) -> None:
        self._circuits.append({"instance": instance_id, "reason": reason})
        self._wake.set()

    def _prompt_recorded(self, instance_id: str, blocks: list[int]) -> None:
        if blocks:
            self._prefixes.append((instance_id, blocks))
            if len(self._prefixes) > MAX_PENDING_PREFIXES:
                del self._prefixes[: len(self._prefixes) - MAX_PENDING_PREFIXES]
            if not self._wake.is_set():
                self._wake.set()

    async def _send_loop(self) -> None:
        # asleep while there is nothing to send (an idle replica does not wake up for it); a
        # circuit goes out at once, prefix recordings are gathered for FLUSH_S into one message
        while True:
            await self._wake.wait()
            if not self._circuits:
                await asyncio.sleep(FLUSH_S)
            self._wake.clear()
            try:
                await self._send()
            except Exception:
                log.exception("signal sharing: sending failed")

    async def _send(self) -> None:
        replica = self.shared.replica_id
        circuits, self._circuits = self._circuits, []
        for circuit in circuits:  # at once: others must stop sending there
            message = {"replica": replica, **circuit}
            await self.shared.publish(CIRCUIT_SUBJECT, json.dumps(message).encode())
        prefixes, self._prefixes = self._prefixes, []
        if prefixes:
            message = {"replica": replica, "recorded": prefixes}
            await self.shared.publish(PREFIX_SUBJECT, json.dumps(message, separators=(",", ":")).encode())

    # ------------------------------------------------------------- incoming
    async def _on_circuit(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            replica, instance_id = str(message["replica"]), str(message["instance"])
        except (ValueError, KeyError, TypeError):
            log.warning("signal sharing: a malformed circuit message ignored")
            return
        state = self.cluster.instances.get(instance_id)
        if replica == self.shared.replica_id or state is None:
            return
        state.breaker.trip(self.cluster.clock())
        state.last_error = f"found failing by replica {replica}: {message.get('reason')}"
        log.warning("instance %s avoided: replica %s found it failing", instance_id, replica)

    async def _on_prefixes(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            if message["replica"] == self.shared.replica_id:
                return
            recorded = [(str(i), [int(h) for h in blocks]) for i, blocks in message["recorded"]]
        except (ValueError, KeyError, TypeError):
            log.warning("signal sharing: a malformed prefix message ignored")
            return
        for instance_id, blocks in recorded:
            self.cluster.record_remote_prompt(instance_id, blocks)
