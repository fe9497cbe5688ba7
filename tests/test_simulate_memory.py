"""The in-memory transport of ``pdgate simulate`` behaves as the HTTP pool does for its callers:
an origin nobody serves refuses, a reply is read whole or relayed as written, closing an
unfinished reply cancels its endpoint (the request is aborted), a finished one lets it run to its
end, a deadline fails the reply, and hop costs delay the arrival in virtual time."""

from __future__ import annotations

import asyncio

import pytest

from pdgate.common.http_client import UpstreamError
from pdgate.common.virtual_time import run_virtual
from pdgate.simulate.memory import MemoryReply, MemoryTransport

pytestmark = pytest.mark.unit
ORIGIN = ("127.0.0.1", 9000, False)


def test_unserved_origins_refuse_and_replies_are_read_or_relayed() -> None:
    async def main() -> None:
        transport = MemoryTransport()
        with pytest.raises(UpstreamError, match="nothing serves it"):
            await transport.request(ORIGIN, "GET", "/", b"", headers={}, timeout_s=1)

        async def chunks(method: str, path: str, headers: dict[str, str], body: bytes, reply: MemoryReply) -> None:
            reply.begin(200, {"Content-Type": "text/event-stream"})
            for piece in (b"a", b"b", body):
                await asyncio.sleep(0.01)
                reply.feed(piece)
            reply.finish()

        transport.serve("127.0.0.1", 9000, chunks)
        whole = await transport.request(ORIGIN, "POST", "/", b"c", headers={}, timeout_s=1)
        assert whole.status == 200 and whole.headers["content-type"] == "text/event-stream"
        assert await whole.read() == b"abc"
        relayed = await transport.request(ORIGIN, "POST", "/", b"z", headers={}, timeout_s=1)
        seen: list[bytes] = [await relayed.first_chunk()]
        await relayed.relay(seen.append)
        assert seen == [b"a", b"b", b"z"]
        await transport.close()

    run_virtual(main())


def test_closing_cancels_only_an_unfinished_answer() -> None:
    async def main() -> None:
        transport = MemoryTransport()
        ended: list[str] = []

        async def endpoint(method: str, path: str, headers: dict[str, str], body: bytes, reply: MemoryReply) -> None:
            reply.begin(200, {})
            if path == "/finished":
                reply.finish()
            try:
                await asyncio.sleep(1.0)  # bookkeeping after the answer, or a stream still running
                ended.append(path)
            except asyncio.CancelledError:
                ended.append(f"{path} cancelled")
                raise

        transport.serve("127.0.0.1", 9000, endpoint)
        for path in ("/finished", "/streaming"):
            reply = await transport.request(ORIGIN, "GET", path, b"", headers={}, timeout_s=5)
            reply.close()
        await asyncio.sleep(2.0)
        assert sorted(ended) == ["/finished", "/streaming cancelled"]
        await transport.close()

    run_virtual(main())


def test_a_deadline_fails_the_reply_and_hops_take_virtual_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport = MemoryTransport(hop_s=0.002)
        arrived: list[float] = []

        async def slow(method: str, path: str, headers: dict[str, str], body: bytes, reply: MemoryReply) -> None:
            arrived.append(loop.time())
            reply.begin(200, {})
            await asyncio.sleep(10.0)

        transport.serve("127.0.0.1", 9000, slow, s_per_kib=0.001)
        start = loop.time()
        reply = await transport.request(ORIGIN, "POST", "/", b"x" * 2048, headers={}, timeout_s=0.5)
        assert arrived[0] - start == pytest.approx(0.002 + 0.002)  # the hop, and 2 KiB at 1 ms each
        with pytest.raises(UpstreamError, match="within 0.5 s"):
            await reply.read()
        assert loop.time() - start == pytest.approx(0.5)
        await transport.close()

    run_virtual(main())
