"""Property tests of the gateway's configuration loading (gateway/config.py and its sections,
pdgate/common/yamlfile.py), as ``pdgate serve --config FILE`` reads it.

A valid configuration that touches every section is changed in up to three places (a value
replaced by garbage of any type or by a number at or past a bound, a key deleted or misspelt, an
unknown key added) and validated. The properties:

* :meth:`GatewayConfig.model_validate` either accepts the result or raises pydantic's
  ``ValidationError`` (nothing else: no ``TypeError``, ``KeyError``, ``OSError``,
  ``RecursionError``...), and its errors point at what was changed: at least one names a changed
  field (the field itself, a part of it, or the section it is in) or is a check across sections
  whose message names the fields, and none names a section that was not changed;
* :meth:`GatewayConfig.load` on any file (that configuration written as YAML and then garbled,
  or any bytes) returns a config or raises ``ConfigError`` whose message starts with the file's
  path, and :func:`read_yaml_mapping` returns a mapping or raises ``YamlFileError`` naming it.

The tests at the end pin bugs these properties found outside this file, since fixed.

``PDGATE_PROPERTY_EXAMPLES`` raises the number of examples (the default keeps this file fast).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from pydantic import ValidationError

from pdgate.common.yamlfile import YamlFileError, read_yaml_mapping
from pdgate.gateway.config import ConfigError, GatewayConfig

pytestmark = pytest.mark.unit

Place = tuple[str | int, ...]
BOUNDARY_NUMBERS = (
    0,
    -1,
    1,
    2,
    0.5,
    -0.0,
    1e-300,
    2**31,
    2**63,
    -(2**63),
    10**30,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
)
# what a check across sections (GatewayConfig._consistent, error location ()) names in its message
CROSS_FIELD_WORDS = ("instances", "models", "model ", "tenants")


def property_settings(default_examples: int) -> settings:
    """Deterministic, no example database written into the repository; more examples on request."""
    examples = int(os.environ.get("PDGATE_PROPERTY_EXAMPLES") or default_examples)
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


def valid_config() -> dict[str, Any]:
    """A configuration that validates and sets something in every section."""
    return {
        "host": "127.0.0.1",
        "port": 8000,
        "api_keys": ["client-key"],
        "models": [
            {
                "name": "m",
                "tokenizer": "builtin",
                "max_model_len": 4096,
                "lora": {"load_on_demand": True, "adapters": {"m-lora": "/loras/a"}, "load_timeout_s": 30},
            }
        ],
        "instances": [
            {
                "id": "prefill-0",
                "url": "http://127.0.0.1:8101",
                "kind": "sim",
                "role": "prefill",
                "model": "m",
                "kv_events": {"endpoint": "tcp://*:5601", "replay_endpoint": "tcp://*:5602", "topic": "kv"},
                "launch": {"profile": "h100-llama-3-8b", "time_scale": 1.0, "args": {"seed": 1}},
            },
            {
                "id": "decode-0",
                "url": "https://127.0.0.1:8102/",
                "kind": "vllm",
                "role": "decode",
                "model": "m",
                "block_size": 16,
                "hash_seed": 0,
                "prefix_caching_hash_algo": "sha256",
                "max_cpu_loras": 2,
                "launch": {"model_path": "/models/m", "device": "cpu", "side_channel_port": 5600},
            },
            {
                "id": "flex-0",
                "url": "http://127.0.0.1:8103",
                "kind": "sim",
                "role": "flex",
                "serving": "both",
                "model": "m",
            },
        ],
        "scheduling": {
            "plugins": [{"name": "prefix", "type": "prefix-affinity"}, {"name": "pick", "type": "max-score"}],
            "profiles": {"decode": [{"pluginRef": "prefix", "weight": 1.0}, {"pluginRef": "pick"}]},
            "profileHandler": {"type": "pd-split", "parameters": {}},
        },
        "health": {"interval_s": 2.0, "timeout_s": 1.0, "failure_threshold": 3, "cooldown_s": 5},
        "scrape_interval_s": 1.0,
        "max_body_bytes": 1 << 20,
        "retries": 1,
        "slo": {
            "default": {"ttft_ms": 2000, "tpot_ms": 100},
            "classes": [
                {
                    "name": "gold",
                    "ttft_ms": 500,
                    "priority": 2,
                    "api_keys": ["gold-key"],
                    "routes": ["/v1/chat/completions"],
                }
            ],
            "honor_headers": True,
        },
        "admission": {"enabled": True, "on_infeasible": "best-effort", "max_queue": 10, "recheck_ms": 5},
        "tenants": {
            "identify_by": ["api_key", "header"],
            "header": "X-Tenant",
            "tenants": [
                {"name": "acme", "api_keys": ["acme-key"], "slo_class": "gold", "requests_per_minute": 60, "weight": 2}
            ],
        },
        "cost_model": {"dir": None, "q_high": 0.9, "min_new_samples": 20, "length_source": "client"},
        "tracing": {"enabled": False, "endpoint": "http://127.0.0.1:4318", "sample_ratio": 0.5, "headers": {"a": "b"}},
        "logging": {"level": "info", "format": "json", "access_log": True},
        "migration": {
            "enabled": True,
            "mechanism": "auto",
            "max_concurrent": 2,
            "max_failovers": 2,
            "stall_timeout_s": 0,
        },
        "admin": {"api_key": "admin-key", "drain_wait_s": 10},
        "tls": {"cert_file": None, "key_file": None, "client_ca_file": None, "admin_requires_client_cert": False},
        "upstream_tls": {"ca_file": None, "cert_file": None, "key_file": None},
        "sharing": {"enabled": False, "load_interval_s": 0.02},
        "role_balancer": {"enabled": True, "interval_s": 5, "prefill_utilisation": 0.85},
        "scaling": {"enabled": True, "minimum": {"decode": 1}, "maximum": {"decode": 4}, "actuator": {"type": "none"}},
    }


# ---------------------------------------------------------------------------- mutations
def paths(node: Any, at: Place = ()) -> Iterator[Place]:
    """Every place in ``node``, below its root."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*at, key)
        yield from paths(child, (*at, key))


def parent_of(root: Any, path: Place) -> Any:
    node = root
    for key in path[:-1]:
        node = node[key]
    return node


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(BOUNDARY_NUMBERS),
    st.text(max_size=12),
    st.text("ab/.\x00", min_size=200, max_size=400),  # long names (file paths, urls)
    st.binary(max_size=8),  # what YAML's !!binary gives
    st.dates(),
    st.datetimes(),
)
garbage = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], list[Place]]:
    """A valid config changed in 1 to 3 places, and those places."""
    config = valid_config()
    changed: list[Place] = []
    for _ in range(draw(st.integers(1, 3))):
        places = list(paths(config))
        path = draw(st.sampled_from(places))
        parent = parent_of(config, path)
        key = path[-1]
        change = draw(st.sampled_from(["replace", "replace", "bound", "delete", "unknown", "misspell"]))
        if change == "replace":
            parent[key] = draw(garbage)
        elif change == "bound":
            parent[key] = draw(st.sampled_from(BOUNDARY_NUMBERS))
        elif change == "delete":
            del parent[key]
        elif isinstance(parent, dict) and change == "unknown":
            path = (
                *path[:-1],
                draw(st.text(min_size=1, max_size=8).filter(lambda k, taken=set(parent): k not in taken)),
            )
            parent[path[-1]] = draw(garbage)
        elif isinstance(parent, dict) and isinstance(key, str) and key.swapcase() != key:
            parent[key.swapcase()] = parent.pop(key)
            changed.append(path)  # (the key that is now missing)
            path = (*path[:-1], key.swapcase())
        else:
            parent[key] = draw(garbage)
        changed.append(path)
    return config, changed


# ----------------------------------------------------------------------------- checking
def located(loc: tuple[Any, ...], path: Place, data: Any) -> bool:
    """Whether an error at ``loc`` is at ``path``, inside it, or at what holds it. Pydantic puts
    a union member's name ("VllmLaunch") or "[key]" in a location: parts that are no key of the
    data at that place are skipped."""
    node, i = data, 0
    for part in loc:
        if i == len(path):
            return True  # inside the changed value
        if part == path[i]:
            i += 1
            node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
        elif isinstance(node, dict | list) and _has(node, part):
            return False  # a sibling of the changed place
    return True  # at the changed place or what holds it


def _has(node: dict[Any, Any] | list[Any], key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(key, int) and 0 <= key < len(node)


def check_errors(error: ValidationError, changed: list[Place], data: dict[str, Any]) -> None:
    errors = error.errors()
    assert errors
    sections = {path[0] for path in changed}
    for e in errors:
        loc = e["loc"]
        if loc:
            assert loc[0] in sections, f"an error in a section nobody changed: {loc} ({e['msg']}); changed {changed}"
    named = any(
        (not e["loc"] and any(word in e["msg"] for word in CROSS_FIELD_WORDS))
        or (e["loc"] and any(located(e["loc"], path, data) for path in changed))
        for e in errors
    )
    assert named, f"no error names a changed field {changed}: {[(e['loc'], e['msg']) for e in errors]}"


# --------------------------------------------------------------------------- properties
def test_the_base_config_is_valid() -> None:
    GatewayConfig.model_validate(valid_config())


@property_settings(400)
@given(case=mutated())
def test_a_changed_config_is_accepted_or_refused_naming_what_changed(case: tuple[dict[str, Any], list[Place]]) -> None:
    config, changed = case
    data = copy.deepcopy(config)
    try:
        GatewayConfig.model_validate(config)
        tally("accepted")
    except ValidationError as error:
        check_errors(error, changed, data)
        tally("refused")
    assert config == data or _has_nan(data), "validation changed the caller's data"


def _has_nan(node: Any) -> bool:
    if isinstance(node, float):
        return math.isnan(node)
    if isinstance(node, dict):
        return any(_has_nan(v) for v in node.values())
    if isinstance(node, list | frozenset):
        return any(_has_nan(v) for v in node)
    return False


@property_settings(100)
@given(root=garbage)
def test_a_config_that_is_no_mapping_is_refused(root: Any) -> None:
    assume(not isinstance(root, dict))
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate(root)


YAML_NOISE = (
    "\n",
    " ",
    "\t",
    ":",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "&a ",
    "*a",
    "!!binary ",
    "!!python/object ",
    "? ",
    "#",
    "'",
    '"',
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "<<: ",
    "\\",
    "\x00",
    "\ufeff",
    "é",
)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """A configuration file: the valid one changed and written as YAML, garbled at the text
    level; or any bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    config, _ = draw(mutated())
    text = yaml.safe_dump(_plain(config), allow_unicode=True, sort_keys=False, default_flow_style=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(YAML_NOISE) | st.text(max_size=3)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 10)) :]
    return text.encode("utf-8", "surrogatepass")


def _plain(node: Any) -> Any:
    """``node`` as safe_dump can write it (frozensets as lists, like YAML sequences)."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list | frozenset):
        return [_plain(v) for v in node]
    return node


@property_settings(250)
@given(content=config_files())
def test_any_config_file_loads_or_fails_with_a_config_error_naming_the_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gateway.yaml"
        path.write_bytes(content)
        try:
            mapping = read_yaml_mapping(path, empty_ok=False)
        except YamlFileError as error:
            assert str(error).startswith(str(path))
        else:
            assert isinstance(mapping, dict)
        try:
            config = GatewayConfig.load(path)
        except ConfigError as error:
            assert str(error).startswith(str(path)), str(error)
        else:
            assert isinstance(config, GatewayConfig)


# ------------------------------------------------------------- bugs these properties found, fixed
@pytest.mark.parametrize("section", ["tls", "upstream_tls"])
def test_an_overlong_tls_file_name_is_a_validation_error(section: str) -> None:
    files = {"cert_file": "x" * 300, "key_file": "/nonexistent.key"} if section == "tls" else {"ca_file": "x" * 300}
    config = {**valid_config(), section: files}
    with pytest.raises(ValidationError, match=section):
        GatewayConfig.model_validate(config)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("models: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError, match=str(path)):
        GatewayConfig.load(path)


def test_yaml_types_load_as_validation_errors(tmp_path: Path) -> None:
    """YAML gives more than JSON's types: dates, binary, sets, aliases (also cyclic ones)."""
    path = tmp_path / "types.yaml"
    for text in (
        "host: 2024-01-01\nmodels: []\ninstances: []\n",
        "host: !!binary aGk=\nport: !!set {1, 2}\n",
        "models: &a [*a]\ninstances: [{url: 'http://a:1', model: m}]\n",
        "1: x\n~: y\n",
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=str(path)):
            GatewayConfig.load(path)
