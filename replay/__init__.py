"""The recovery engineers' tool: rebuild, verify, export, inspect and prove (`votes replay`).

Two independent ways to read a fencing group's write-ahead log (one per group, holding all
its shards' records, read once for all the shards asked for) live here, on purpose:
- `rebuild` goes through the engine's own path (shards.segment_log / shards.kafka_wal to
  read, shards.records.decode_record to decode, ShardState.apply and the compiled
  engine.fastpath.apply_group to apply), so what it writes is what an engine would hold.
- `verify`, `export` and `prove` recount with their own frame parser (replay/rawlog.py),
  their own untyped decoding and their own counting (replay/recount.py), so a bug in the
  engine's path shows up as a difference instead of being repeated.

Nothing here writes to a write-ahead log. Only `rebuild` writes at all (a snapshot, and a
checkpoint under `<data dir>/replay/`), and on the embedded log only while it holds the
group's fence.
"""
