"""deploy/prometheus: the config and the alerting rules load in Prometheus's own checker, and
`promtool test rules` makes every alert fire on synthetic series (and none on a healthy stack).
promtool comes with Debian's `prometheus` package (scripts/install.sh --test)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import ROOT

PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(not PROMTOOL, reason="promtool not installed "
                                    "(apt-get install prometheus; scripts/install.sh --test)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True,
                          timeout=120)


@needs_promtool
def test_config_and_rules_pass_promtool_checks():
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 7 rules found" in rules.stdout
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_every_alert_fires_in_the_rule_unit_tests():
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    # each alert of alerts.yml has at least one case where it fires, and the healthy case
    # checks each one stays silent
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    assert alerts == {"S2SStageDown", "S2SVoiceToVoiceSlow", "S2SStageLagGrowing",
                      "S2SDeadLetters"}
    cases = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases[0]["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == alerts and silent == alerts


@needs_promtool
def test_a_broken_expectation_fails(tmp_path):
    """The rule tests can fail: expect the dead stt stage to be silent and promtool objects."""
    cases = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    cases["rule_files"] = [str(PROM / "alerts.yml")]
    down = cases["tests"][1]["alert_rule_test"][1]
    assert down["alertname"] == "S2SStageDown" and down["exp_alerts"]
    down["exp_alerts"] = []
    (tmp_path / "t.yml").write_text(yaml.safe_dump(cases))
    out = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "t.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "S2SStageDown" in out.stdout + out.stderr
