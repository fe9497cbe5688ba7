"""Engine load parsed from the engines' own metric names."""

from __future__ import annotations

import pytest

from pdgate.adapters.load import parse_load

pytestmark = pytest.mark.unit

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:num_requests_running_extra 99
"""

SGLANG = """sglang:num_running_reqs{engine_type="decode",model_name="m"} 4
sglang:num_queue_reqs{engine_type="decode",model_name="m"} 1 1700000000000
sglang:token_usage{engine_type="decode",model_name="m"} 0.125
"""


def test_vllm_names_summed_over_ranks_and_usage_is_the_max():
    load = parse_load(VLLM, "vllm", 5.0)
    assert (load.running, load.waiting, load.kv_usage) == (5, 7, 0.5)
    assert (load.prefix_queries, load.prefix_hits, load.scraped_at) == (1000.0, 250.0, 5.0)


def test_sglang_names_with_timestamps():
    load = parse_load(SGLANG, "sglang", 1.0)
    assert (load.running, load.waiting, load.kv_usage) == (4, 1, 0.125)
