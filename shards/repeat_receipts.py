"""The receipts a 409 carries: rebuilt from the log once per repeating voter, then cached.

A repeat vote's 409 carries the voter's original receipt. Unless its batch is among the
owner's recently signed ones, that means reading the record back from the log and
rebuilding the batch's Merkle tree (`rebuild_signed_batch`): about four times an accepted
vote's CPU (perf/bench_attack.py's duplicate class). A token replayed many times (a stolen
one, or a client retrying in a loop) rebuilds it once: `RepeatReceipts` keeps the receipts
of the voters who repeated lately, by (poll, voter id), least recently used out first,
`entries_max` at most (a receipt document is about 1 KB).
"""

from __future__ import annotations

import array
from collections import OrderedDict

from engine import signing
from shards.records import VoteBatch
from shards.state import ShardState

REPEAT_RECEIPTS_CACHED = 4096  # per fencing group: ~4 MB at most


class RepeatReceipts:
    def __init__(self, entries_max: int = REPEAT_RECEIPTS_CACHED) -> None:
        self.entries_max = entries_max
        self._receipts: OrderedDict[tuple[str, int], signing.ReceiptDocument] = OrderedDict()

    def get(self, poll: str, voter_id: int) -> signing.ReceiptDocument | None:
        receipt = self._receipts.get((poll, voter_id))
        if receipt is not None:
            self._receipts.move_to_end((poll, voter_id))
        return receipt

    def put(self, poll: str, voter_id: int, receipt: signing.ReceiptDocument) -> None:
        self._receipts[(poll, voter_id)] = receipt
        while len(self._receipts) > self.entries_max:
            self._receipts.popitem(last=False)


def rebuild_signed_batch(hasher: signing.VoterHasher, state: ShardState,
                         batch: VoteBatch) -> signing.SignedBatch:
    """The signed batch of a vote record read back from the log (its stored signature).
    `state` is any shard of the batch's group: a poll's definition is alike in all of them,
    and each vote group names its own shard."""
    shards_total = state.shards_total
    runs = [signing.VoteRun(group.shard, group.poll, state.polls[group.poll].definition.options,
                            array.array("Q", [voter_index * shards_total + group.shard
                                              for voter_index in array.array("I", group.voters)]
                                        ).tobytes(),
                            group.options)
            for group in batch.groups]
    return signing.SignedBatch.restore(
        hasher, group=batch.group, batch_seq=batch.batch_seq, time_ms=batch.time_ms,
        runs=runs, batch_position=batch.batch_position, batch_nodes=batch.batch_nodes,
        key_id=batch.key_id, signature=batch.signature,
    )
