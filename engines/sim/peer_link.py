"""The contract of how one simulated engine reaches its peers: the four engine-to-engine exchanges.

* ``read_kv``: a decode leg takes the KV a PD prefill peer (or a migration source) holds, vLLM
  NIXL style (``POST /sim/kv/read`` on ``remote_host:remote_port``);
* ``wait_bootstrap_room``: an SGLang decode leg long-polls the prefill's bootstrap server
  (``GET /sim/bootstrap/{room}`` on ``bootstrap_host:bootstrap_port``);
* ``reserve`` / ``release``: a live migration's source sets KV blocks aside on its target and
  gives them back (``POST /sim/migrate/reserve|release``).

A peer is named by ``(host, port)`` exactly as the request parameters carry it. The links are in
:mod:`engines.sim.peers` (over HTTP, or in-process); this module is only the contract, so that
:class:`~engines.sim.state.SimState` can hold a link without depending on the routes a link calls.
Transfer times are not modelled by a link: the callers spend them on the engine's clock.
"""

from __future__ import annotations

from typing import Any, Protocol


class PeerError(Exception):
    """A reservation exchange failed.

    ``status`` is the peer's error status with its body in ``text``; None when the peer could not
    be reached, and ``detail`` then says why (the ``repr`` of the underlying failure).
    """

    def __init__(self, detail: str, status: int | None = None, text: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.text = text


class PeerLink(Protocol):
    """The engine-to-engine exchanges; a peer is ``(host, port)`` as the params carry it."""

    async def read_kv(self, host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
        """Take the KV the peer holds (``body``: remote_engine_id, remote_request_id, remote_block_ids).

        Returns ``{"token_ids", "num_tokens"}`` (plus ``"migration"`` for a migration's hold).
        Raises :class:`KvPullError` when the peer is unreachable or refuses.
        """
        ...

    async def wait_bootstrap_room(self, host: str, port: int, room: Any, wait_s: float) -> dict[str, Any]:
        """SGLang: wait up to ``wait_s`` wall seconds for ``room``'s prefill, then take its KV.

        ``port`` is the prefill's bootstrap port. Returns ``{"token_ids", "num_tokens"}``; raises
        :class:`KvPullError` when the peer is unreachable, refuses or times out.
        """
        ...

    async def reserve(self, host: str, port: int, body: dict[str, Any]) -> Any:
        """Set KV blocks aside on a migration target (``body``: num_blocks, source_engine_id, request_id).

        Returns the target's answer (``{"reservation_id", "num_blocks", "expires_in_s"}``); raises
        :class:`PeerError` (or TimeoutError) when the target is unreachable or refuses.
        """
        ...

    async def release(self, host: str, port: int, reservation_id: str) -> None:
        """Best effort: give an unused reservation back; never raises for a failed exchange."""
        ...
