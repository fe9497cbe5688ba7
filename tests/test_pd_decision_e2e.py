"""The per-request PD decision end to end (issue 17): a 1P1D fleet of real sim processes behind a
gateway whose profile handler is ``pd-adaptive``; what the gateway logs and counts for each path,
and answers that are the same either way."""

from __future__ import annotations

import json
import urllib.request

import pytest
from support.fleet import MODEL, engine_flags, instance_entry, write_config
from support.procs import start_pdgate
from support.streams import client
from support.waiting import wait_until

from pdgate.gateway.config import DEFAULT_SCHEDULING
from pdgate.scheduler.plugins import profile_handlers as ph


def _access(proc) -> list[dict]:
    records = [json.loads(line) for line in list(proc.output) if line.startswith('{"ts"')]
    return [r for r in records if r["logger"] == "pdgate.access"]


def _gateway(sim_factory, tmp_path, **parameters):
    engines = [sim_factory(*engine_flags(role), time_scale=1.0) for role in ("prefill", "decode")]
    entries = [instance_entry(e, role, "sim") for e, role in zip(engines, ("prefill", "decode"), strict=True)]
    scheduling = {**DEFAULT_SCHEDULING, "profileHandler": {"type": "pd-adaptive", "parameters": parameters}}
    path = write_config(tmp_path / "adaptive.yaml", entries, scheduling=scheduling)
    gateway = start_pdgate("serve", "--config", str(path), "--log-format", "json", "--access-log")
    return gateway, entries[0]["id"], entries[1]["id"]


@pytest.mark.parametrize(("margin", "path"), [(1.0, "colocated"), (0.01, "split")])
def test_each_request_is_split_or_colocated_as_predicted_and_answered_the_same(sim_factory, tmp_path, margin, path):
    gateway, prefill, decode = _gateway(sim_factory, tmp_path, ttft_margin=margin)
    try:
        api = client(gateway.url)
        prompt = "a prompt long enough to be worth a thought " * 40
        kwargs = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 6,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        whole = api.completions.create(**kwargs)
        streamed = "".join(c.choices[0].text for c in api.completions.create(stream=True, **kwargs) if c.choices)
        assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 6
        wait_until(lambda: len(_access(gateway)) >= 2, message="two access-log lines")
        # idle, with the cost model's priors: colocating saves the hand-off, so it is predicted
        # faster; asked to win by 100x, it is not, and the request is split
        expected = (None, decode) if path == "colocated" else (prefill, decode)
        assert [(r["prefill"], r["decode"]) for r in _access(gateway)] == [expected] * 2
        reason = ph.COLOCATED_FASTER if path == "colocated" else ph.SPLIT_FASTER
        metrics = urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10).read().decode()
        line = f'pdgate_pd_decisions_total{{model="{MODEL}",path="{path}",reason="{reason}"}} 2.0'
        assert line in metrics, [m for m in metrics.splitlines() if m.startswith("pdgate_pd_decisions")]
    finally:
        gateway.stop()
