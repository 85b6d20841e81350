"""Proves GET /v1/receipts/{receipt} checks the owner's log and state, not only the signature
(engine/receipt_lookup.py), on real `votes serve` processes (embedded log):

- every receipt engine A gave answers "counted" on A, through either of its two workers
  (a lookup landing on the worker that does not own the receipt's group is relayed);
- the same receipts, validly signed (B shares A's keys, as a restored deployment would),
  answer "not-counted" on B, whose log holds other votes at those offsets (and more of
  them): a lookup that only checked the signature said "counted" here;
- on C, with the same keys and the poll but no votes, they are past what C's shards have
  applied: "pending";
- a receipt with one byte of its signature changed answers "not-counted" on A.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from engine.keys import load_keys
from engine.receipts import decode_receipt, encode_receipt
from engine.tokens import issue_admin_token, issue_voter_token
from tests.support import http_client
from tests.support.engine_process import EngineProcess

POLL = "lookup"
ENVIRONMENT = {"VOTES_SHARDS": "8", "VOTES_GROUPS": "4"}
A_VOTERS = range(1, 13)
B_VOTERS = range(1000, 1120)  # more votes than A's, so A's offsets fall inside B's logs
LOOKUPS_PER_RECEIPT = 4  # spread over the workers by the kernel's accept


def start(tmp_path: Path, name: str, keys_from: Path | None, workers: int) -> EngineProcess:
    engine = EngineProcess(tmp_path / name, tmp_path / f"{name}.log", ENVIRONMENT,
                           workers=workers, keys_from=keys_from)
    engine.start()
    engine.wait_ready()
    return engine


def open_poll(engine: EngineProcess) -> None:
    keyring = load_keys(engine.data_dir)
    admin = {"authorization": f"Bearer {issue_admin_token(keyring, ttl_s=600)}"}
    answer = http_client.post(engine.base_url + "/v1/polls", headers=admin,
                              json={"id": POLL, "options": ["red", "blue"]})
    assert answer.status_code == 201, answer.text


def vote(engine: EngineProcess, voter: int) -> str:
    token = issue_voter_token(load_keys(engine.data_dir), voter, ttl_s=600)
    answer = http_client.post(f"{engine.base_url}/v1/polls/{POLL}/votes",
                              json={"option": "red" if voter % 2 else "blue"},
                              headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 201, answer.text
    receipt: str = answer.json()["receipt"]
    return receipt


def statuses(engine: EngineProcess, receipt: str) -> set[str]:
    found = set()
    for _ in range(LOOKUPS_PER_RECEIPT):
        answer = http_client.get(f"{engine.base_url}/v1/receipts/{receipt}")
        assert answer.status_code == 200, answer.text
        found.add(answer.json()["status"])
    return found


def with_signature_changed(receipt_text: str) -> str:
    """The same receipt, well-formed, one bit of its signature flipped."""
    receipt = decode_receipt(receipt_text)
    signature = bytearray(receipt.signature)
    signature[0] ^= 1
    return encode_receipt(msgspec.structs.replace(receipt, signature=bytes(signature)))


def test_a_receipt_counts_only_where_its_vote_is_in_the_log(tmp_path: Path) -> None:
    engine_a = start(tmp_path, "a", None, workers=2)
    engines = [engine_a]
    try:
        engines.append(engine_b := start(tmp_path, "b", engine_a.data_dir, workers=1))
        engines.append(engine_c := start(tmp_path, "c", engine_a.data_dir, workers=1))
        for engine in engines:
            open_poll(engine)
        receipts = [vote(engine_a, voter) for voter in A_VOTERS]
        for voter in B_VOTERS:
            vote(engine_b, voter)
        for receipt in receipts:
            assert statuses(engine_a, receipt) == {"counted"}
            assert statuses(engine_b, receipt) == {"not-counted"}
            assert statuses(engine_c, receipt) == {"pending"}
        assert statuses(engine_a, with_signature_changed(receipts[0])) == {"not-counted"}
    finally:
        for engine in engines:
            engine.stop()
