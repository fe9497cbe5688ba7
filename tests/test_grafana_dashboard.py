"""The Grafana dashboard (configs/grafana/pdgate-dashboard.json) only queries what the gateway exports.

Every ``pdgate_*`` name in a panel's PromQL must be a sample name of a metric family that
``GatewayMetrics`` registers (derived from the family's type, since label-less families with no
children export no samples yet), and every label a selector or grouping clause names must exist on
one of the metrics that expression references.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from pdgate.gateway.metrics import GatewayMetrics, LightCounter, LightHistogram

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parent.parent / "configs" / "grafana" / "pdgate-dashboard.json"

METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])pdgate_[a-z0-9_]+")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
SELECTOR_RE = re.compile(r"\{([^{}]*)\}")
MATCHER_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"\"\s*(?:,|$)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}


def exported_samples() -> dict[str, set[str]]:
    """Sample name -> label names, for every sample name the gateway's registry can export."""
    metrics = GatewayMetrics()
    declared: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            declared[obj._name] = set(obj._labelnames)
        elif isinstance(obj, LightHistogram | LightCounter):
            declared[obj.name] = set(obj.labelnames)
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = set(declared.get(family.name, ()))
        for sample in family.samples:  # e.g. the Info, which is set at start and not kept as an attribute
            labels.update(k for k in sample.labels if k not in ("le", "quantile"))
        assert family.name in declared or family.samples, (
            f"cannot tell the labels of metric family {family.name!r}: not an attribute of GatewayMetrics "
            "and it exports no samples"
        )
        for suffix in SUFFIXES.get(family.type, ("",)):
            samples[family.name + suffix] = labels
    return samples


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows nest their panels


def strip_strings(expr: str) -> str:
    """Replace string literals (label values, regexes, "$model") by ``""`` so that braces,
    parentheses and names inside them are not mistaken for PromQL syntax."""
    return STRING_RE.sub('""', expr)


def expr_problems(expr: str, samples: dict[str, set[str]]) -> list[str]:
    """What is wrong with one PromQL expression: unknown metric names, unknown labels."""
    code = strip_strings(expr)
    names = METRIC_RE.findall(code)
    if not names:
        return ["references no pdgate_ metric"]
    problems = [f"metric {name!r} is not exported by the gateway" for name in names if name not in samples]
    known = set().union(*(samples[name] for name in names if name in samples))
    if any(name.endswith("_bucket") for name in names):
        known.add("le")
    used: list[str] = []
    for body in SELECTOR_RE.findall(code):
        rest = body.strip()
        while rest:
            match = MATCHER_RE.match(rest)
            if match is None:
                problems.append(f"cannot parse label matchers {{{body}}}")
                break
            used.append(match.group(1))
            rest = rest[match.end() :].strip()
    for clause in GROUPING_RE.findall(code):
        used.extend(label.strip() for label in clause.split(",") if label.strip())
    referenced = ", ".join(sorted(set(names)))
    problems.extend(
        f"label {label!r} is on none of its metrics ({referenced})"
        for label in dict.fromkeys(used)
        if label != "__name__" and label not in known
    )
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def samples() -> dict[str, set[str]]:
    return exported_samples()


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard.get("title"), "dashboard has no title"
    assert dashboard.get("uid") == "pdgate-overview"
    assert isinstance(dashboard.get("panels"), list) and dashboard["panels"], "dashboard has no panels"
    ids: dict[int, str] = {}
    problems: list[str] = []
    for panel in all_panels(dashboard["panels"]):
        title = panel.get("title") or f"<untitled id={panel.get('id')}>"
        if not panel.get("title"):
            problems.append(f"panel id={panel.get('id')} has no title")
        pid = panel.get("id")
        if not isinstance(pid, int):
            problems.append(f"panel {title!r} has no integer id")
        elif pid in ids:
            problems.append(f"panel {title!r} reuses id {pid} of panel {ids[pid]!r}")
        else:
            ids[pid] = title
        grid = panel.get("gridPos")
        if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
            problems.append(f"panel {title!r} has no complete gridPos")
        elif grid["x"] + grid["w"] > 24:
            problems.append(f"panel {title!r} is wider than the 24-column grid")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not any(isinstance(t.get("expr"), str) and t["expr"].strip() for t in targets):
            problems.append(f"panel {title!r} has no target with a non-empty expr")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {title!r} does not use the ${{datasource}} variable")
    assert not problems, "\n".join(problems)


def test_panels_query_only_exported_metrics_and_labels(dashboard: dict[str, Any], samples: dict[str, set[str]]) -> None:
    problems: list[str] = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            expr = target.get("expr") or ""
            problems.extend(
                f"panel {panel.get('title')!r} target {target.get('refId')}: {problem}\n    expr: {expr}"
                for problem in expr_problems(expr, samples)
            )
    assert not problems, "\n".join(problems)


def test_template_variables(dashboard: dict[str, Any], samples: dict[str, set[str]]) -> None:
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    assert variables.get("datasource", {}).get("type") == "datasource"
    assert variables["datasource"].get("query") == "prometheus"
    for name in ("model", "instance"):
        assert name in variables, f"template variable {name!r} is missing"
        query = variables[name].get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        match = LABEL_VALUES_RE.match(text)
        assert match, f"template variable {name!r} does not query label_values(<pdgate metric>, <label>): {text!r}"
        metric, label = match.groups()
        assert metric in samples, f"template variable {name!r}: metric {metric!r} is not exported by the gateway"
        assert label in samples[metric], f"template variable {name!r}: label {label!r} is not on {metric!r}"


def test_checker_catches_wrong_names(samples: dict[str, set[str]]) -> None:
    """The checks above are only as good as the parser: make sure it flags what it should."""
    assert expr_problems('sum by (status) (rate(pdgate_requests_total{model=~"$model"}[1m]))', samples) == []
    assert (
        expr_problems(
            "histogram_quantile(0.9, sum by (le) (rate(pdgate_e2e_request_latency_seconds_bucket[1m])))", samples
        )
        == []
    )
    assert expr_problems("count by (version) (pdgate_build_info)", samples) == []
    assert expr_problems("rate(pdgate_requests[1m])", samples)  # the family name is not a sample name
    assert expr_problems("rate(pdgate_request_total[1m])", samples)
    assert expr_problems('rate(pdgate_requests_total{instance="a{1}"}[1m])', samples)
    assert expr_problems("sum by (le) (pdgate_instance_draining)", samples)
    assert expr_problems("sum by (instance, phase) (pdgate_instance_inflight_requests)", samples)
