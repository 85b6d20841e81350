"""Rebuild checkpoints: where an interrupted rebuild of a shard resumes.

One file per shard, `<data dir>/replay/rebuild-shard-<4 digits>.checkpoint`: msgpack of
`Checkpoint`, holding the frozen shard state (shards.snapshots.freeze) at a record boundary
plus what the rebuild was reading (which log, from a snapshot or from the WAL alone) and
the SHA-256 of the last record applied, so a resume can tell that the log still holds that
record at that offset. Written to a temporary file, fsync'd and renamed over the previous
one, so a crash leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from replay.errors import DataDamaged
from shards.segment_log import fsync_directory

CHECKPOINT_FORMAT = 1
# A checkpoint holds a whole shard state (shards.snapshots.freeze): about 12 bytes per counted
# vote (the receipt locator's runs it carries) plus the bitmap's ~1 bit per eligible voter.
CHECKPOINT_BYTES_MAX = 8 * 1024 * 1024 * 1024


class Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    shard: int
    shards_total: int
    source: str  # "snapshot" (newest snapshot + WAL) or "wal" (the WAL alone)
    wal: str  # which log: "embedded:<wal dir>" or "kafka:<topic>"
    started_offset: int  # where the rebuild started reading
    wal_offset_next: int
    last_record_offset: int
    last_record_sha256: str
    records: int  # applied before this checkpoint, over every run
    votes: int
    elapsed_s: float
    state: bytes  # shards.snapshots.freeze


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Checkpoint)


def checkpoint_path(data_dir: Path, shard: int) -> Path:
    return Path(data_dir) / "replay" / f"rebuild-shard-{shard:04d}.checkpoint"


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(_encoder.encode(checkpoint))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def read_checkpoint(path: Path) -> Checkpoint | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(CHECKPOINT_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    if len(data) > CHECKPOINT_BYTES_MAX:
        raise DataDamaged(f"{path} is larger than {CHECKPOINT_BYTES_MAX} bytes; "
                          "remove it or run with --restart")
    try:
        checkpoint = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec: bad UTF-8 in a string
        raise DataDamaged(f"{path} does not decode ({exc}); run with --restart") from None
    if checkpoint.format != CHECKPOINT_FORMAT:
        raise DataDamaged(f"{path} has format {checkpoint.format}, not {CHECKPOINT_FORMAT}; "
                          "run with --restart")
    return checkpoint


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
