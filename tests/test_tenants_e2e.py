"""Tenants through real gateways: budgets refused with the reason, output charged as it streams,
budgets held across two replicas sharing NATS, per-tenant metrics; the official openai client."""

from __future__ import annotations

import openai
import pytest
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.waiting import wait_until

PROMPT = "Tell me about the tenants of a shared inference gateway"


def tenants_config(**acme) -> dict:
    return {
        "identify_by": ["api_key", "header"],
        "tenants": [
            {"name": "acme", "api_keys": ["sk-acme"], **acme},
            {"name": "zeta", "api_keys": ["sk-zeta"]},
        ],
    }


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(url: str, key: str, tokens: int = 8, **kw):
    return client(url, key).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}, **kw
    )


def test_a_tenant_over_its_request_budget_gets_429_with_the_reason(sim_factory, tmp_path) -> None:
    engine = sim_factory(*engine_flags("both"))
    config = write_config(
        tmp_path / "gw.yaml", [instance_entry(engine, "both", "sim")], tenants=tenants_config(requests_per_minute=3)
    )
    gateway = start_gateway(config)
    try:
        for _ in range(3):
            ask(gateway.url, "sk-acme")
        with pytest.raises(openai.RateLimitError) as err:
            ask(gateway.url, "sk-acme")
        response = err.value.response
        assert response.headers["x-pdgate-reject-reason"] == "tenant-budget"
        assert int(response.headers["retry-after"]) == 20  # one request refills in 60 s / 3
        assert "acme" in err.value.message and "requests-per-minute" in err.value.message
        assert ask(gateway.url, "sk-zeta").choices[0].text  # another tenant is not touched
        assert metric(gateway.url, "pdgate_tenant_budget_rejections_total", tenant="acme", budget="requests") == 1
        assert metric(gateway.url, "pdgate_tenant_requests_total", tenant="acme", status="200") == 3
        assert metric(gateway.url, "pdgate_tenant_requests_total", tenant="acme", status="429") == 1
        assert metric(gateway.url, "pdgate_tenant_slo_total", tenant="zeta") == 1
    finally:
        gateway.stop()


def test_streamed_output_is_charged_to_the_tenant_while_it_streams(sim_factory, tmp_path) -> None:
    engine = sim_factory(*engine_flags("both"), time_scale=0.5)  # slower than real time: 300 tokens take seconds
    tenants = tenants_config(tokens_per_minute=100_000)
    tenants["charge_interval_s"] = 0.1
    config = write_config(tmp_path / "gw.yaml", [instance_entry(engine, "both", "sim")], tenants=tenants)
    gateway = start_gateway(config)
    try:

        def charged_output() -> float:
            return metric(gateway.url, "pdgate_tenant_tokens_total", tenant="acme", kind="output")

        mid_stream = 0.0
        stream = ask(gateway.url, "sk-acme", tokens=300, stream=True, stream_options={"include_usage": True})
        usage = None
        for n, chunk in enumerate(stream):
            usage = chunk.usage or usage
            if n == 150:  # charged within a round (0.1 s) and three events of what reached the client
                mid_stream = wait_until(lambda: (c := charged_output()) >= 140 and c, timeout=5)
        assert 140 <= mid_stream < 300  # charged while it streamed, not at the end
        assert usage is not None and usage.completion_tokens == 300
        assert charged_output() == 300  # exact at the end, from the usage
        assert metric(gateway.url, "pdgate_tenant_tokens_total", tenant="acme", kind="prompt") == usage.prompt_tokens
    finally:
        gateway.stop()


def test_a_budget_holds_across_two_replicas(sim_factory, tmp_path, nats) -> None:
    engine = sim_factory(*engine_flags("both"))
    tenants = tenants_config(requests_per_minute=4)
    tenants["charge_interval_s"] = 0.05
    config = write_config(
        tmp_path / "gw.yaml",
        [instance_entry(engine, "both", "sim")],
        tenants=tenants,
        sharing={"nats_url": nats.url},
    )
    a, b = start_gateway(config), start_gateway(config)
    try:
        # B counts A's use from when it first hears A (A's totals before that are a baseline:
        # docs/tenants.md): wait until the replicas hear each other
        wait_until(lambda: metric(b.url, "pdgate_sharing_replicas") == 1, timeout=10, message="B to hear A")
        for _ in range(3):
            ask(a.url, "sk-acme")

        def b_knows() -> bool:
            return metric(b.url, "pdgate_tenant_budget_remaining", tenant="acme", budget="requests") < 1.5

        wait_until(b_knows, timeout=10, message="replica B to charge the 3 requests A served")
        ask(b.url, "sk-acme")  # the fourth of the minute's four
        wait_until(
            lambda: metric(a.url, "pdgate_tenant_budget_remaining", tenant="acme", budget="requests") < 0.5,
            timeout=10,
            message="replica A to charge the request B served",
        )
        for url in (a.url, b.url):
            with pytest.raises(openai.RateLimitError):
                ask(url, "sk-acme")
        ask(b.url, "sk-zeta")
    finally:
        for gw in (a, b):
            gw.stop()


def test_a_tenant_header_naming_no_tenant_is_refused(sim_factory, tmp_path) -> None:
    engine = sim_factory(*engine_flags("both"))
    config = write_config(tmp_path / "gw.yaml", [instance_entry(engine, "both", "sim")], tenants=tenants_config())
    gateway = start_gateway(config)
    try:
        with pytest.raises(openai.PermissionDeniedError) as err:
            ask(gateway.url, "unused", extra_headers={"x-pdgate-tenant": "nobody"})
        assert "names no configured tenant" in err.value.message
        ask(gateway.url, "unused", extra_headers={"x-pdgate-tenant": "zeta"})
        assert metric(gateway.url, "pdgate_tenant_requests_total", tenant="zeta", status="200") == 1
    finally:
        gateway.stop()
