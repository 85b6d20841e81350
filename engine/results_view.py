"""The results document of a poll, built from its merged CRDT state (pure: no I/O).

Rules: a poll is final once, in every region that holds tallies of it, all `shards` shards
applied its close record; provisional before. While an embargoed poll is not final, counts,
totals and the region and country breakdowns are hidden (empty / 0), and so is the merge version: the
document's `version` stays 0, so neither an ETag nor an SSE event id reveals activity.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, NamedTuple

from engine import crdt

REJECTION_REASONS = ("duplicate", "bad-token", "closed-poll", "not-open", "unknown-option",
                     "rate-limited", "challenge-required", "challenge-failed", "banned")


class Definition(NamedTuple):
    options: list[str]
    embargo: bool
    shards: int
    breakdown: tuple[str, ...] = ()  # "country": the document has a `countries` section


def parse_definition(raw: bytes | str) -> Definition:
    document = json.loads(raw)
    return Definition(list(document["options"]), bool(document["embargo"]),
                      int(document["shards"]), tuple(document.get("breakdown", ())))


def is_final(state: crdt.Counters, poll: str, shards: int) -> bool:
    closed = crdt.closed_shards(state, poll)
    regions = {region for region, _, key_poll, _ in state.tallies if key_poll == poll}
    regions |= set(closed)
    return bool(regions) and all(len(closed.get(region, ())) >= shards for region in regions)


def now_iso() -> str:
    moment = datetime.datetime.now(datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def results_document(poll: str, definition: Definition, state: crdt.Counters,
                     version: int) -> dict[str, Any]:
    final = is_final(state, poll, definition.shards)
    embargoed = definition.embargo and not final
    totals = crdt.totals(state, poll)
    counts = {} if embargoed else {option: totals.get(option, 0)
                                   for option in definition.options}
    regions = {} if embargoed else {
        region: {option: region_counts.get(option, 0) for option in definition.options}
        for region, region_counts in sorted(crdt.region_totals(state, poll).items())}
    document = {**poll_results(poll, counts, final, embargoed, crdt.rejected_totals(state, poll)),
                "regions": regions, "version": 0 if embargoed else version}
    if "country" in definition.breakdown:
        document["countries"] = {} if embargoed else {
            country: {option: country_counts.get(option, 0) for option in definition.options}
            for country, country_counts in sorted(crdt.country_totals(state, poll).items())}
    return document


def poll_results(poll: str, counts: dict[str, int], final: bool, embargoed: bool,
                 rejected: dict[str, int]) -> dict[str, Any]:
    """The fields every results answer has (GET /v1/polls/{poll}/results, engine/openapi.yaml),
    whether from one region's shards (engine/node.py) or the merged CRDT state."""
    return {
        "poll": poll,
        "counts": counts,
        "total": sum(counts.values()),
        "final": final,
        "embargoed": embargoed,
        "rejected": {reason: rejected.get(reason, 0) for reason in REJECTION_REASONS},
        "as_of": now_iso(),
    }
