"""The scaling loop end to end (issue 17, item 4): ``pdgate serve`` with ``scaling.enabled`` and
the ``local`` actuator grows the decode pool under a decode-heavy load and, once the load is
gone and the scale-down window has passed, drains and stops the engine it started."""

from __future__ import annotations

import threading

from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.procs import start_sim
from support.streams import client
from support.waiting import wait_until

PROFILE = "a100-llama-2-7b"  # its decode step grows ~1 % per stream: an 11 ms target holds ~5 streams


def _decoders(url: str) -> list[dict]:
    return [i for i in get_json(f"{url}/admin/instances")["data"] if i["role"] == "decode"]


def test_a_decode_heavy_load_starts_a_decode_engine_and_its_end_stops_it(tmp_path):
    engines = [
        start_sim(*engine_flags(role, extra=("--profile", PROFILE)), time_scale=1.0) for role in ("prefill", "decode")
    ]
    entries = [
        instance_entry(e, role, "sim", cost_profile=PROFILE)
        for e, role in zip(engines, ("prefill", "decode"), strict=True)
    ]
    template = {"kind": "sim", "cost_profile": PROFILE, "launch": {"profile": PROFILE, "time_scale": 1.0}}
    scaling = {
        "enabled": True,
        "interval_s": 0.5,
        "headroom": 0.0,
        "scale_down_window_s": 2.0,
        "drain_timeout_s": 30.0,
        "tpot_target_ms": 11.0,
        "maximum": {"decode": 2, "prefill": 1},
        "actuator": {
            "type": "local",
            "parameters": {"pools": [{"model": MODEL, "role": "decode", "template": template}]},
        },
    }
    gateway = start_gateway(write_config(tmp_path / "scaling.yaml", entries, scaling=scaling))
    stop = threading.Event()

    def long_answers(n: int) -> None:
        api = client(gateway.url)
        while not stop.is_set():
            api.completions.create(model=MODEL, prompt=f"story {n}", max_tokens=150, extra_body={"ignore_eos": True})

    senders = [threading.Thread(target=long_answers, args=(n,)) for n in range(12)]
    try:
        for sender in senders:
            sender.start()
        wait_until(
            lambda: len(_decoders(gateway.url)) == 2, timeout=60, message=lambda: get_json(f"{gateway.url}/admin/plan")
        )

        def sized() -> dict:
            plan = get_json(f"{gateway.url}/admin/plan")["scaling"]
            assert plan["actuator"] == "local"
            return plan["data"][0]

        wait_until(lambda: any("started" in a for a in sized()["actions"]), timeout=30, message=sized)
        assert sized()["instances"]["decode"] == 2 and sized()["forecast"]["decode_streams"] > 5, sized()
        started = next(i["id"] for i in _decoders(gateway.url) if i["id"] != entries[1]["id"])
        assert started.startswith(f"{MODEL}-decode-")
        stop.set()
        for sender in senders:
            sender.join(60)
        # idle: the plan comes down to one decoder after the window; the started engine is drained and stopped
        wait_until(
            lambda: len(_decoders(gateway.url)) == 1, timeout=60, message=lambda: get_json(f"{gateway.url}/admin/plan")
        )
        assert [i["id"] for i in _decoders(gateway.url)] == [entries[1]["id"]]
        wait_until(
            lambda: any("stopped" in a for a in sized()["actions"]),
            timeout=30,
            message="the actuator's stop reported",
        )
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)
        gateway.stop()
        for engine in engines:
            engine.stop()
