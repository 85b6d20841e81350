"""/metrics of a two-worker server counts known traffic exactly, and every metric name the
alert rules, SLO rules and dashboard use is one the engine exports (or is declared in
engine/metrics.py as not emitted yet).

Traffic: N votes answered 201, M duplicates answered 409, K malformed bodies answered 400,
each on a fresh connection so the kernel spreads them over both workers; the scrape is
answered by one worker and must still hold the other worker's counts (multiprocess mode),
once each worker's buffers have been flushed (every FLUSH_INTERVAL_S).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import Config
from engine.metrics import AWAITING_HOOK, FLUSH_INTERVAL_S, NOT_YET_EMITTED
from tests.support.vote_client import bearer

WORKERS = 2
ACCEPTED = 23  # N
DUPLICATES = 7  # M
MALFORMED = 5  # K
FLUSH_WAIT_S = 15.0
SNAPSHOT_EAGERLY = {"VOTES_SNAPSHOT_VOTES_MIN": "1", "VOTES_SNAPSHOT_VOTES_SHARE": "0",
                    "VOTES_SNAPSHOT_INTERVAL_S": "0.2"}
FRESH_CONNECTION = {"Connection": "close"}
MONITORING = Path(__file__).resolve().parents[2] / "deploy/ansible/roles/monitoring/files"
# A metric name in PromQL: vote_... or a recording rule's level:metric:operations.
METRIC_NAME = re.compile(r"\b(vote:[a-z0-9_]+:[a-z0-9_]+|vote_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def engine(server_factory):
    # Snapshots as soon as a shard has a vote, so the snapshot metrics have values to show.
    return server_factory(workers=WORKERS, env=SNAPSHOT_EAGERLY)


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send_known_traffic(engine, client) -> None:
    admin = bearer(engine.admin_token())
    created = client.post("/v1/polls", headers=admin, json={"id": "metrics", "options": ["a"]})
    assert created.status_code == 201, created.text
    tokens = engine.voter_tokens(0, ACCEPTED, poll="metrics")
    for token in tokens:
        answer = client.post("/v1/polls/metrics/votes", headers=bearer(token), json={"option": "a"})
        assert answer.status_code == 201, answer.text
    for token in tokens[:DUPLICATES]:
        answer = client.post("/v1/polls/metrics/votes", headers=bearer(token), json={"option": "a"})
        assert answer.status_code == 409, answer.text
    for _ in range(MALFORMED):
        answer = client.post("/v1/polls/metrics/votes", headers=bearer(tokens[0]),
                             content=b"{not json")
        assert answer.status_code == 400, answer.text


@pytest.fixture(scope="module")
def samples(engine):
    client = engine.client(headers=FRESH_CONNECTION)
    send_known_traffic(engine, client)
    expected = ACCEPTED + DUPLICATES + MALFORMED
    deadline = time.monotonic() + FLUSH_WAIT_S
    while True:
        now = scrape(client)
        seen = value(now, "vote_request_duration_seconds_count", route="vote")
        snapshotted = any(name == "vote_snapshot_last_success_timestamp_seconds"
                          for name, _ in now)
        if (seen >= expected and snapshotted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Past every worker's next flush, so a count that is still growing would show.
    time.sleep(2 * FLUSH_INTERVAL_S)
    return scrape(client)


def test_requests_are_counted_exactly_across_workers(samples) -> None:
    counts = {status: value(samples, "vote_requests_total", route="vote", status=status)
              for status in ("201", "409", "400")}
    assert counts == {"201": ACCEPTED, "409": DUPLICATES, "400": MALFORMED}
    assert value(samples, "vote_requests_total", route="create", status="201") == 1
    assert value(samples, "vote_request_duration_seconds_count", route="vote") == (
        ACCEPTED + DUPLICATES + MALFORMED)
    # Only refusals of a well-formed vote are rejections; a malformed body is not.
    assert value(samples, "vote_rejected_total", reason="duplicate") == DUPLICATES
    assert sum(v for (name, _), v in samples.items() if name == "vote_rejected_total") == DUPLICATES


def test_latency_buckets_are_sub_millisecond_and_cumulative(samples) -> None:
    buckets = sorted((float(dict(labels)["le"]), count) for (name, labels), count in samples.items()
                     if name == "vote_request_duration_seconds_bucket"
                     and dict(labels)["route"] == "vote")
    assert buckets[0][0] < 0.001
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)
    assert buckets[-1] == (float("inf"), ACCEPTED + DUPLICATES + MALFORMED)


def test_commit_cycles_hold_every_accepted_vote(samples) -> None:
    # Items per cycle count records and votes: the poll's creation plus the 201 votes at least
    # (a poll's record may reach every group).
    items = value(samples, "vote_commit_cycle_items_sum")
    assert items >= ACCEPTED + 1
    assert value(samples, "vote_commit_cycle_duration_seconds_count") >= 1
    assert value(samples, "vote_wal_append_errors_total", kind="outcome-unknown") == 0
    assert value(samples, "vote_wal_append_errors_total", kind="wal-unavailable") == 0
    # Every group's backlog is exported, and every 201 above waited for nothing left behind.
    backlog = {dict(labels)["group"]: count for (name, labels), count in samples.items()
               if name == "vote_wal_pending_votes"}
    assert set(backlog) == {str(group) for group in range(Config().validate().groups)}, backlog
    assert all(count == 0 for count in backlog.values()), backlog


def names_used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in sorted((MONITORING / "rules").glob("*.yml")):
        used[path.name] = set(METRIC_NAME.findall(path.read_text()))
    dashboard = json.loads((MONITORING / "dashboards/votes-engine.json").read_text())
    used["votes-engine.json"] = {name for panel in dashboard["panels"]
                                 for target in panel["targets"]
                                 for name in METRIC_NAME.findall(target["expr"])}
    return used


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_rules_and_dashboard_use_only_exported_or_declared_names(samples) -> None:
    exported = {base_name(name) for name, _ in samples} | {name for name, _ in samples}
    recorded = set()
    for path in (MONITORING / "rules").glob("*.yml"):
        recorded |= set(re.findall(r"record: (\S+)", path.read_text()))
    declared = set(NOT_YET_EMITTED) | set(AWAITING_HOOK)
    print("declared, not emitted yet (issues 12/13):", sorted(NOT_YET_EMITTED))
    print("defined, hook not called yet:", sorted(AWAITING_HOOK))
    unknown = {source: sorted(name for name in names
                              if name not in exported and name not in recorded
                              and base_name(name) not in declared)
               for source, names in names_used().items()}
    assert all(not names for names in unknown.values()), unknown
    # The list of parts not built stays honest: nothing in it is exported already. (The
    # AWAITING_HOOK metrics exist, some exported at 0 until their hook is called.)
    assert not set(NOT_YET_EMITTED) & exported, set(NOT_YET_EMITTED) & exported
    assert sum(len(names) for names in names_used().values()) > 20


def test_request_id_is_echoed_or_generated(engine) -> None:
    client = engine.client()
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers[
        "x-request-id"] == "abc-123"
    for bad in ("x" * 200, "a b", "{}"):
        answered = client.get("/healthz", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert answered != bad and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", answered)
    assert client.get("/healthz").headers["x-request-id"] != client.get(
        "/healthz").headers["x-request-id"]
