"""When a shard owner takes a snapshot by itself (shards/group_owner.py `_maybe_snapshot`);
`votes snapshot now` (engine/snapshot_requests.py) takes one whatever this says."""

from __future__ import annotations

from engine.config import Config


def snapshot_due(config: Config, votes_at_last: int, votes_now: int, elapsed_s: float) -> bool:
    """Whether a shard takes a snapshot: snapshot_votes_min new votes and snapshot_votes_share
    of the votes the last snapshot held (its cost per vote stays flat as the state grows),
    or any new vote once snapshot_interval_s has passed."""
    new_votes = votes_now - votes_at_last
    votes_due = max(config.snapshot_votes_min, config.snapshot_votes_share * votes_at_last)
    return new_votes >= votes_due or (new_votes > 0 and elapsed_s >= config.snapshot_interval_s)
