"""SIGTERM on a gateway replica (issue 22, item 3): it says it is stopping on /ready while it
serves on for ``shutdown.ready_delay_s``, then takes no new connections, lets the streams in
flight finish within ``shutdown.grace_s``, gives the leadership up at once, and exits 0.

Real processes: simulated engines, ``pdgate serve`` (one process, and two replicas sharing a real
NATS server), the openai client streaming through it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess
from support.streams import client
from support.waiting import wait_until

pytestmark = pytest.mark.slow

LEASE_S = 9.0
TOKENS = 480  # a few seconds of real-time decode on the simulated engine (time_scale 1)


class StreamInThread:
    """A streamed completion read in a thread: its chunks' text, how it ended, and when."""

    def __init__(self, url: str, max_tokens: int = TOKENS) -> None:
        self.chunks: list[str] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, max_tokens), daemon=True)
        self._thread.start()

    def _read(self, url: str, max_tokens: int) -> None:
        try:
            stream = client(url).completions.create(
                model=MODEL,
                prompt="a stream that outlives the SIGTERM",
                max_tokens=max_tokens,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices:
                    self.chunks.append(chunk.choices[0].text)
                    self.finish = chunk.choices[0].finish_reason or self.finish
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()


def _status(url: str, path: str) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _gateway(sim_factory, tmp_path, **settings: Any) -> PdgateProcess:
    engine = sim_factory(*engine_flags("both"), time_scale=1.0)
    config = write_config(tmp_path / "gateway.yaml", [instance_entry(engine, "both", "sim")], **settings)
    return start_gateway(config)


def test_sigterm_stops_readiness_first_finishes_the_streams_and_exits_0(sim_factory, tmp_path) -> None:
    gateway = _gateway(sim_factory, tmp_path, shutdown={"ready_delay_s": 1.0, "grace_s": 20})
    try:
        assert _status(gateway.url, "/ready")[0] == 200
        streams = [StreamInThread(gateway.url) for _ in range(3)]
        wait_until(lambda: all(s.chunks for s in streams), 15, message="every stream under way")
        sent = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)

        # the delay: not ready, and still serving what comes (a load balancer's last requests)
        code, body = wait_until(lambda: (r := _status(gateway.url, "/ready"))[0] == 503 and r, 5, message="503")
        assert body["stopping"] is True and body["ready"] is False
        late = client(gateway.url).completions.create(
            model=MODEL, prompt="one more", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert late.choices[0].finish_reason == "length" and time.monotonic() - sent < 1.0

        # then no new connections, while the streams go on to their last token
        wait_until(lambda: not _accepts(gateway.port), 10, message="the listener closed")
        assert not all(s.done.is_set() for s in streams), "the streams ended before the listener closed"
        wait_until(lambda: gateway.proc.poll() is not None, 30, message="the gateway to exit")
        assert gateway.proc.returncode == 0, gateway.log[-3000:]
        for s in streams:
            assert s.done.wait(5) and s.error is None, s.error
            assert s.finish == "length" and len(s.chunks) >= TOKENS - 1, (s.finish, len(s.chunks))
        assert "stopping: no new connections; " in gateway.log
    finally:
        gateway.stop()


def test_streams_still_running_after_the_grace_are_cut_and_it_still_exits_0(sim_factory, tmp_path) -> None:
    gateway = _gateway(sim_factory, tmp_path, shutdown={"ready_delay_s": 0, "grace_s": 0.5})
    try:
        stream = StreamInThread(gateway.url, max_tokens=2000)  # about 40 s: far beyond the grace
        wait_until(lambda: bool(stream.chunks), 15, message="the stream under way")
        sent = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: gateway.proc.poll() is not None, 15, message="the gateway to exit")
        assert gateway.proc.returncode == 0, gateway.log[-3000:]
        assert time.monotonic() - sent < 10
        assert stream.done.wait(10) and stream.finish != "length"  # cut, not finished
    finally:
        gateway.stop()


def test_a_leader_that_stops_hands_the_leadership_on_at_once(sim_factory, tmp_path, nats) -> None:
    engine = sim_factory(*engine_flags("both"), time_scale=20.0)
    sharing = {"nats_url": nats.url, "leader_lease_s": LEASE_S, "load_interval_s": 0.1}
    config = write_config(
        tmp_path / "gateway.yaml",
        [instance_entry(engine, "both", "sim")],
        sharing=sharing,
        shutdown={"ready_delay_s": 0, "grace_s": 2},
    )
    replicas = [start_gateway(config) for _ in range(2)]
    try:

        def leader() -> PdgateProcess | None:
            views = [get_json(f"{r.url}/ready") for r in replicas]
            named = {v.get("leader") for v in views}
            if len(named) != 1:
                return None
            return next((r for r, v in zip(replicas, views, strict=True) if v["replica"] == v["leader"]), None)

        first = wait_until(leader, 20, message="one leader named by both")
        other = replicas[1 - replicas.index(first)]
        first.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: first.proc.poll() is not None, 15, message="the leader to exit")
        assert first.proc.returncode == 0, first.log[-3000:]
        exited = time.monotonic()
        other_id = get_json(f"{other.url}/ready")["replica"]
        # a released lease is taken at the follower's next round (a third of a lease); one left to
        # expire would be taken two thirds of a lease after the exit at the earliest
        wait_until(lambda: get_json(f"{other.url}/ready")["leader"] == other_id, 15, message="the other replica leads")
        assert time.monotonic() - exited < LEASE_S / 3 + 2.0
        assert "gave up the leadership" in first.log
    finally:
        for r in replicas:
            r.stop()


def test_sigterm_on_a_workers_supervisor_lets_every_workers_streams_finish(sim_factory, tmp_path) -> None:
    engine = sim_factory(*engine_flags("both"), time_scale=1.0)
    config = write_config(
        tmp_path / "gateway.yaml", [instance_entry(engine, "both", "sim")], shutdown={"ready_delay_s": 0, "grace_s": 20}
    )
    gateway = start_gateway(config, env={"PDGATE_WORKERS": "2"})
    try:
        wait_until(lambda: any(" workers (pids " in line for line in gateway.output), 10, message="the banner")
        streams = [StreamInThread(gateway.url) for _ in range(4)]  # the kernel spreads them over both workers
        wait_until(lambda: all(s.chunks for s in streams), 15, message="every stream under way")
        gateway.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: gateway.proc.poll() is not None, 40, message="the supervisor to exit")
        assert gateway.proc.returncode == 0, gateway.log[-3000:]
        for s in streams:
            assert s.done.wait(5) and s.error is None, s.error
            assert s.finish == "length" and len(s.chunks) >= TOKENS - 1, (s.finish, len(s.chunks))
        assert gateway.log.count("stopping: no new connections; ") == 2  # each worker, gracefully
    finally:
        gateway.stop()


def test_a_sigterm_right_after_the_ready_line_still_stops_it_cleanly(sim_factory, tmp_path) -> None:
    """Found by CI: the handlers were installed after the ready line and its garbage collection, so
    a SIGTERM sent at once (an orchestrator's, a test's) killed the process (-15)."""
    for workers in ("1", "2"):
        engine = sim_factory(*engine_flags("both"), time_scale=1.0)
        config = write_config(tmp_path / f"gateway-{workers}.yaml", [instance_entry(engine, "both", "sim")])
        gateway = start_gateway(config, env={"PDGATE_WORKERS": workers})
        try:
            gateway.proc.send_signal(signal.SIGTERM)  # the moment the ready line is read
            wait_until(lambda g=gateway: g.proc.poll() is not None, 30, message="the gateway to exit")
            assert gateway.proc.returncode == 0, (workers, gateway.log[-2000:])
        finally:
            gateway.stop()
