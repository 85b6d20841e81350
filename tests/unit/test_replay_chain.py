"""Proves that the export hash chain (replay/chain.py) is exactly what its docstring defines:
a known answer recomputed here from the spelled-out bytes, and the published hex values; that
every field of a step and the order of the votes change the digest; and that the CSV form of
an export carries the same checkable facts as its JSON form.
"""

from __future__ import annotations

import hashlib
import struct

from replay import chain
from replay.export import checkable, checkable_from_csv, export_csv

H0_HEX = "ad0335a983591e77d97c012772322a3b4e29941e5f62ff33043aa44ffca07bc6"
H1_HEX = "620a133f4844b87448001b1c087a15be53710f01775876155cacf068f7a078c2"


def test_known_answer_from_the_definition():
    h0 = hashlib.sha256(b"votes/export-chain/v1\x00" + b"\x00\x01p" + b"\x00\x00\x00\x01").digest()
    step = (struct.pack(">Q", 0) + struct.pack(">I", 0) + struct.pack(">Q", 9)
            + b"\x00\x01a")
    h1 = hashlib.sha256(h0 + step).digest()
    assert chain.chain_start("p", 1) == h0
    assert h0.hex() == H0_HEX
    assert chain.chain_digest("p", 1, [(0, 0, 9, "a")]) == h1
    assert h1.hex() == H1_HEX
    assert chain.chain_digest("p", 1, []) == h0


def test_every_field_and_the_order_change_the_digest():
    votes = [(100, 0, 9, "a"), (100, 1, 12, "b"), (250, 0, 15, "a")]
    digest = chain.chain_digest("p", 1, votes)
    variants = [
        chain.chain_digest("p", 1, [votes[1], votes[0], votes[2]]),
        chain.chain_digest("p", 1, votes[:2]),
        chain.chain_digest("q", 1, votes),
        chain.chain_digest("p", 2, votes),
        chain.chain_digest("p", 1, [(101, 0, 9, "a")] + votes[1:]),
        chain.chain_digest("p", 1, [(100, 1, 9, "a")] + votes[1:]),
        chain.chain_digest("p", 1, [(100, 0, 10, "a")] + votes[1:]),
        chain.chain_digest("p", 1, [(100, 0, 9, "b")] + votes[1:]),
    ]
    assert len({digest, *variants}) == len(variants) + 1


def test_csv_and_json_exports_carry_the_same_facts():
    document = {
        "format": "votes-export/v1", "poll": "p", "options": ["a", "b"],
        "counts": {"a": 3, "b": 1}, "total": 4, "final": True, "closed_shards": 2,
        "shards_total": 2,
        "rejected_in_log": {"duplicate": 1, "poll-not-open": 0, "option-invalid": 2},
        "engine_rejected_in_memory": {"source": "http://x", "as_of": "t",
                                      "counts": {"duplicate": 5}, "note": "n"},
        "shards": [
            {"shard": 0, "created": True, "closed": True, "end_offset": 10,
             "counts": {"a": 2, "b": 0}, "chain_digest": "ab" * 32, "chained_votes": 2},
            {"shard": 1, "created": True, "closed": True, "end_offset": 20,
             "counts": {"a": 1, "b": 1}, "chain_digest": "cd" * 32, "chained_votes": 2},
        ],
    }
    assert checkable_from_csv(export_csv(document)) == checkable(document)
