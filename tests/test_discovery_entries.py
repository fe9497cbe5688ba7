"""What an engine pod means to Kubernetes discovery: its instance entry from labels and
annotations, whether it may serve, and the config that turns discovery on (issue 22, item 1)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from lightkube.models.core_v1 import PodCondition, PodStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod
from pydantic import ValidationError

from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.discovery.pod_entries import pod_facts
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig
from pdgate.gateway.instance_config import InstanceConfig

pytestmark = pytest.mark.unit

SETTINGS = KubernetesDiscoveryConfig(label_selector="pdgate.io/pool=engines", instance={"block_size": 64})


def pod(
    name: str = "decode-0",
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ip: str | None = "10.0.0.7",
    ready: bool = True,
    phase: str = "Running",
    deleting: bool = False,
) -> Pod:
    return Pod(
        metadata=ObjectMeta(
            name=name,
            uid=f"uid-{name}",
            labels={"pdgate.io/role": "decode", "pdgate.io/engine": "vllm", **(labels or {})},
            annotations={"pdgate.io/model": "meta-llama/Llama-3.1-8B", **(annotations or {})},
            deletionTimestamp="2026-12-07T10:00:00Z" if deleting else None,
        ),
        status=PodStatus(
            phase=phase,
            podIP=ip,
            conditions=[PodCondition(type="Ready", status="True" if ready else "False")],
        ),
    )


def test_a_ready_pod_makes_a_valid_instance_entry_from_its_labels_and_annotations() -> None:
    facts = pod_facts(pod(), SETTINGS)
    assert facts.ready and not facts.terminating and facts.problem is None
    assert facts.entry == {
        "block_size": 64,
        "kind": "vllm",
        "id": "decode-0",
        "url": "http://10.0.0.7:8000",
        "role": "decode",
        "model": "meta-llama/Llama-3.1-8B",  # from the annotation: a label value cannot hold '/'
        "pod_uid": "uid-decode-0",
    }
    inst = InstanceConfig.model_validate(facts.entry)
    assert inst.spec().id == "decode-0" and inst.pod_uid == "uid-decode-0"


def test_the_pods_own_annotations_override_port_and_fields_with_its_ip_and_name_filled_in() -> None:
    own = {"bootstrap_port": 8998, "kv_events": {"endpoint": "tcp://*:5557", "topic": "kv-{pod_name}"}}
    facts = pod_facts(
        pod(
            "prefill-1",
            labels={"pdgate.io/role": "prefill", "pdgate.io/engine": "sglang"},
            annotations={"pdgate.io/port": "30000", "pdgate.io/instance": json.dumps(own)},
            ip="fd00::5",
        ),
        SETTINGS,
    )
    assert facts.entry is not None
    assert facts.entry["url"] == "http://[fd00::5]:30000" and facts.entry["kind"] == "sglang"
    assert facts.entry["bootstrap_port"] == 8998 and facts.entry["kv_events"]["topic"] == "kv-prefill-1"
    assert InstanceConfig.model_validate(facts.entry).bootstrap_port == 8998


@pytest.mark.parametrize(
    ("change", "ready", "terminating"),
    [
        ({"ready": False}, False, False),
        ({"phase": "Pending"}, False, False),
        ({"deleting": True}, False, True),
        ({"ip": None}, False, False),
    ],
)
def test_only_a_running_ready_pod_with_an_ip_may_serve(change: dict[str, Any], ready: bool, terminating: bool) -> None:
    facts = pod_facts(pod(**change), SETTINGS)
    assert (facts.ready, facts.terminating) == (ready, terminating)
    assert (facts.entry is None) == (change.get("ip", "x") is None)


@pytest.mark.parametrize(
    ("labels", "annotations", "problem"),
    [
        ({"pdgate.io/role": ""}, {}, "has no pdgate.io/role label"),
        ({}, {"pdgate.io/model": ""}, "names no model"),
        ({}, {"pdgate.io/port": "http"}, "pdgate.io/port is 'http', not a port"),
        ({}, {"pdgate.io/instance": "{not json"}, "pdgate.io/instance is not JSON"),
        ({}, {"pdgate.io/instance": "[1]"}, "must be a JSON object"),
    ],
)
def test_a_pod_that_makes_no_entry_says_why(labels: dict, annotations: dict, problem: str) -> None:
    facts = pod_facts(pod(labels=labels, annotations=annotations), SETTINGS)
    assert facts.entry is None and facts.problem is not None and problem in facts.problem


def test_the_model_label_serves_when_no_annotation_names_one() -> None:
    facts = pod_facts(pod(labels={"pdgate.io/model": "tiny"}, annotations={"pdgate.io/model": ""}), SETTINGS)
    assert facts.entry is not None and facts.entry["model"] == "tiny"


def _config(**extra: Any) -> dict[str, Any]:
    return {"models": [{"name": "m"}], **extra}


def test_with_discovery_a_gateway_may_start_with_no_instances_and_without_it_may_not() -> None:
    config = GatewayConfig.model_validate(_config(discovery={"kubernetes": {"label_selector": "app=engines"}}))
    assert config.instances == [] and config.discovery.kubernetes is not None
    assert config.discovery.kubernetes.role_label == "pdgate.io/role"
    with pytest.raises(ValidationError, match="list at least one engine instance"):
        GatewayConfig.model_validate(_config())
    with pytest.raises(ValidationError, match="label_selector"):
        GatewayConfig.model_validate(_config(discovery={"kubernetes": {}}))
    with pytest.raises(ValidationError, match="unready_grace_s"):
        GatewayConfig.model_validate(
            _config(discovery={"kubernetes": {"label_selector": "a=b", "unready_grace_s": -1}})
        )


def test_discovery_and_the_kubernetes_scaling_actuator_are_not_both_given_the_pods() -> None:
    actuator = {"type": "kubernetes", "parameters": {"pools": []}}
    with pytest.raises(ValidationError, match="would both add the engine pods"):
        GatewayConfig.model_validate(
            _config(
                discovery={"kubernetes": {"label_selector": "a=b"}}, scaling={"enabled": True, "actuator": actuator}
            )
        )


def test_the_shutdown_section_bounds_what_a_supervisor_waits() -> None:
    entry = {"url": "http://127.0.0.1:1", "kind": "sim", "role": "both", "model": "m"}
    config = GatewayConfig.model_validate(_config(instances=[entry], shutdown={"ready_delay_s": 5, "grace_s": 30}))
    assert config.shutdown.total_s == 40.0
    with pytest.raises(ValidationError, match="grace_s"):
        GatewayConfig.model_validate(_config(instances=[entry], shutdown={"grace_s": -1}))


def _slice(*endpoints: dict[str, Any]) -> Any:
    from lightkube.resources.discovery_v1 import EndpointSlice

    return EndpointSlice.from_dict(
        {"metadata": {"name": "engines-abc"}, "addressType": "IPv4", "endpoints": list(endpoints)}
    )


def _endpoint(pod_name: str | None, **conditions: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": ["10.0.0.7"], "conditions": conditions}
    if pod_name is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod_name}
    return out


def test_endpoint_conditions_read_as_the_api_defines_them_when_nil() -> None:
    from pdgate.gateway.discovery.pod_entries import EndpointState, endpoint_states

    states = endpoint_states(
        [
            _slice(
                _endpoint("nil-0"),  # every condition nil: ready, serving, not terminating
                _endpoint("ready-0", ready=True),
                _endpoint("unready-0", ready=False),
                _endpoint("leaving-0", ready=False, serving=True, terminating=True),
                _endpoint("gone-0", ready=False, serving=False, terminating=True),
                _endpoint(None, ready=True),  # no pod behind it: not an engine of ours
            )
        ]
    )
    assert states == {
        "nil-0": EndpointState(ready=True, terminating=False),
        "ready-0": EndpointState(ready=True, terminating=False),
        "unready-0": EndpointState(ready=False, terminating=False),
        "leaving-0": EndpointState(ready=False, terminating=True),  # serving but terminating: drain, then go
        "gone-0": EndpointState(ready=False, terminating=True),
    }


def test_with_endpointslices_a_pod_serves_only_when_its_endpoint_is_ready() -> None:
    from pdgate.gateway.discovery.pod_entries import EndpointState, with_endpoint

    facts = pod_facts(pod(), SETTINGS)
    assert not with_endpoint(facts, None).ready  # in no slice (yet)
    assert with_endpoint(facts, EndpointState(ready=True, terminating=False)).ready
    leaving = with_endpoint(facts, EndpointState(ready=False, terminating=True))
    assert not leaving.ready and leaving.terminating
    unready_pod = pod_facts(pod(ready=False), SETTINGS)  # the Service's view wins over the pod's condition
    assert with_endpoint(unready_pod, EndpointState(ready=True, terminating=False)).ready
    with pytest.raises(ValidationError, match="needs service"):
        KubernetesDiscoveryConfig(label_selector="a=b", readiness="endpointslices")


def test_a_pod_that_ended_is_on_its_way_out() -> None:
    for phase in ("Failed", "Succeeded"):  # evicted, or exited for good: no deletionTimestamp yet
        facts = pod_facts(pod(phase=phase), SETTINGS)
        assert facts.terminating and not facts.ready, phase


def test_a_pod_several_slices_list_is_ready_when_one_says_so_and_leaving_when_all_do() -> None:
    from pdgate.gateway.discovery.pod_entries import EndpointState, endpoint_states

    moving = [_slice(_endpoint("a-0", ready=True)), _slice(_endpoint("a-0", ready=False, terminating=True))]
    assert endpoint_states(moving) == {"a-0": EndpointState(ready=True, terminating=False)}
    leaving = [_slice(_endpoint("a-0", ready=False, terminating=True))] * 2
    assert endpoint_states(leaving) == {"a-0": EndpointState(ready=False, terminating=True)}


def test_pod_uid_is_discoverys_not_the_config_files() -> None:
    entry = {"url": "http://127.0.0.1:1", "kind": "sim", "role": "both", "model": "m", "pod_uid": "u"}
    with pytest.raises(ValidationError, match="pod_uid is set by Kubernetes discovery"):
        GatewayConfig.model_validate(_config(instances=[entry]))
