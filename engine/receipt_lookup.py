"""Receipt lookup against the live owner of the receipt's shard: did this vote count?

GET /v1/receipts/{receipt} (engine/results_page.py `receipt_status`) checks the receipt's
signature offline first; then the owner of the shard's fencing group runs the checks of
`votes replay prove` (replay/prove.py, steps 2 and 3) that need no recount, on its own log
and state, read-only:
- the receipt's offset is past what the shard has applied: "pending" (a group recovering
  or catching up on another host has not reached it yet);
- the record at that offset of the group's log is the receipt's vote batch of the shard,
  with its vote count, signature and batch node; vote `index` of it is this voter's vote in
  the poll (the voter hash rebuilt with the data dir's secret, and the option, make the
  receipt's leaf); and the shard's bitmap holds that voter: "counted";
- anything else (no such record, another record, another voter or option, the voter not
  in the bitmap): "not-counted".
Step 4 of `prove` (an independent recount of the shard from its log) is the audit, not a
per-request check: it reads the whole log.
"""

from __future__ import annotations

import hmac
from typing import Any

from engine.errors import LogCorrupt, NotReady
from engine.receipts import Receipt, leaf_hash
from replay.errors import BadInput, DataDamaged
from replay.prove import batch_holds_receipt, is_receipts_batch, vote_at
from replay.rawlog import Batch, decode_raw

COUNTED = "counted"
NOT_COUNTED = "not-counted"
PENDING = "pending"


async def owner_receipt_status(owner: Any, receipt: Receipt) -> str:
    """The receipt's status as the shard's owner (shards/group_owner.py GroupOwner) sees it."""
    state = owner.states.get(receipt.shard) if owner.ready else None
    if state is None:
        raise NotReady("the receipt's shard is not ready on its owner")
    if receipt.offset >= state.wal_offset_next:
        return PENDING
    poll = state.polls.get(receipt.poll)
    if poll is None:
        return NOT_COUNTED
    try:
        batch = decode_raw(await owner.wal.read_at(receipt.offset),
                           f"record at offset {receipt.offset}")
        if not (isinstance(batch, Batch) and is_receipts_batch(receipt, batch)
                and batch_holds_receipt(receipt, batch)):
            return NOT_COUNTED
        poll_id, voter_index, option_index = vote_at(batch, receipt.index)
    except (LogCorrupt, DataDamaged, BadInput):  # no record there, or not this receipt's
        return NOT_COUNTED
    options = poll.definition.options
    if poll_id != receipt.poll or option_index >= len(options):
        return NOT_COUNTED
    rebuilt = leaf_hash(poll_id, receipt.shard,
                        owner.hasher(poll_id, state.voter_id(voter_index)), options[option_index])
    claimed = leaf_hash(receipt.poll, receipt.shard, receipt.voter_hash, receipt.option)
    if not hmac.compare_digest(rebuilt, claimed):
        return NOT_COUNTED
    return COUNTED if voter_index in poll.voters else NOT_COUNTED
