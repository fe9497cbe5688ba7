"""benchmarks/tenant_fairness.py: a tenant sending ten times its share at overload, through the
gateway's own code on the simulated fleet (virtual time: the figures do not depend on the host).

The well-behaved tenant keeps the attainment it has alone when the queue is fair between tenants,
and loses much of it when the queue is in deadline order alone (the check that fair share is what
protects it, not spare capacity)."""

from __future__ import annotations

import json
import subprocess
import sys

from support.scripts import BENCHMARKS


def test_the_calm_tenant_keeps_its_attainment_only_with_fair_share(tmp_path):
    out = tmp_path / "fairness.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tenant_fairness.py"), "--duration", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    arms = {arm["arm"]: arm for arm in json.loads(out.read_text())["arms"]}
    alone = arms["calm alone"]["calm"]
    fair, deadline = arms["both, fair share"], arms["both, deadline order"]
    assert alone["attainment_pct"] >= 95  # calm alone is well within the fleet's capacity
    assert fair["flood"]["refused_429"] > fair["flood"]["requests"] / 3  # the fleet is overloaded
    assert fair["calm"]["attainment_pct"] >= alone["attainment_pct"] - 3  # within a few points of alone
    assert deadline["calm"]["attainment_pct"] <= fair["calm"]["attainment_pct"] - 20
    assert "calm vs alone" in result.stdout
