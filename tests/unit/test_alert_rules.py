"""The monitoring role's alert and SLO rules are valid Prometheus rules (`promtool check
rules`), behave as their unit tests say (`promtool test rules`: each alert fires on its
failure and stays quiet when healthy), and every alert's runbook anchor is a heading of
docs/observability.md. promtool is Debian's `prometheus` package, installed through
deploy/local/installer.py when missing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.local.installer import ensure_debian_package

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "deploy/ansible/roles/monitoring/files"
RULES = sorted((FILES / "rules").glob("*.yml"))
RULE_TESTS = sorted((FILES / "rules-tests").glob("*.test.yml"))
PROMTOOL_TIMEOUT_S = 120
ALERTS_EXPECTED = {"VoteWalOutcomeUnknown", "VoteWalUnavailable", "VoteHigh5xxRate",
                   "VoteP99LatencyHigh", "VoteFencingLost", "VoteReplicationLagHigh",
                   "VoteSnapshotStale", "VoteRateLimiterFailOpen", "VoteCrdtRecountDisagreement"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_debian_package("promtool", "prometheus")


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S, check=False)


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for path in RULES
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check(promtool) -> None:
    done = run(promtool, "check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(RULES) == 2


def test_rules_pass_their_promtool_unit_tests(promtool) -> None:
    done = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_TESTS) == 2


def test_every_failure_of_the_issue_has_an_alert() -> None:
    assert ALERTS_EXPECTED <= set(alerts())


def test_every_alert_is_unit_tested() -> None:
    tested = {case["alertname"] for path in RULE_TESTS
              for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    # The slow-burn SLO alerts share their expression's shape with the fast ones tested.
    untested = {name for name in set(alerts()) - tested if not re.search(r"Burn(1d|3d|6h)$", name)}
    assert not untested, untested


def test_every_runbook_anchor_is_a_heading_of_the_docs() -> None:
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in (REPO / "docs/observability.md").read_text().splitlines()
                if line.startswith("#")}
    anchors = {rule["annotations"]["runbook"].split("#", 1)[1] for rule in alerts().values()}
    assert anchors <= headings, anchors - headings
