"""Receipt lookup on the `results` role: GET /v1/receipts/{receipt} without shard state.

The results role is the public read side, so it checks what it can alone and asks the
ingest role only for what needs a shard's log and state:
1. the receipt parses (400 `receipt-invalid` if not), and its poll has published results
   (404 if not);
2. its signature and Merkle paths verify with the public receipt keys
   (keys/receipt-public.json): a forged or altered receipt is answered `not-counted` here,
   and never costs the ingest role anything;
3. the ingest role (`results_ingest_url`: any ingest node, which relays to the owner of the
   receipt's fencing group) runs the read-only checks of `votes replay prove` and answers
   (engine/results_page.py `receipt_status`); its answer is relayed after a schema check.
   It timing out, refusing, or answering anything but 200 is 503 `not-ready`: the status
   is unknown, which is neither `pending` nor `not-counted`.
A final answer can no longer change (the poll is closed and every shard applied it), so it
is kept in a bounded LRU and sent with a long Cache-Control: one receipt looked up by many
hits the ingest role once. Bounds: `results_ingest_connections_max` lookups in flight
(beyond: 503 `overloaded`), `results_ingest_timeout_s` each, FINAL_ANSWERS_MAX kept.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import msgspec

from engine.config import Config
from engine.errors import NotReady, Overloaded
from engine.keys import RECEIPT_PUBLIC_FILE, keys_dir, load_public_key_document
from engine.receipts import decode_receipt, verify_receipt

FINAL_ANSWERS_MAX = 65_536
INGEST_ANSWER_BYTES_MAX = 4096
FINAL_CACHE_CONTROL = "public, max-age=86400, immutable"
PROVISIONAL_CACHE_CONTROL = "no-store"


class ReceiptAnswer(msgspec.Struct, forbid_unknown_fields=True):
    """The ingest role's answer (engine/openapi.yaml, getReceiptStatus)."""

    poll: str
    shard: int
    status: Literal["counted", "not-counted", "pending"]
    final: bool
    option: str


_answer_decoder = msgspec.json.Decoder(ReceiptAnswer)


def public_keys_file(config: Config) -> Path:
    return Path(config.receipt_public_keys_path or keys_dir(config.data_path) / RECEIPT_PUBLIC_FILE)


class IngestReceipts:
    """One results process's receipt lookups through the ingest role."""

    def __init__(self, ingest_url: str, public_keys: dict[str, bytes], timeout_s: float,
                 connections_max: int) -> None:
        self.ingest_url = ingest_url.rstrip("/")
        self.public_keys = public_keys
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s),
                                      limits=httpx.Limits(max_connections=connections_max))
        self.in_flight = asyncio.Semaphore(connections_max)
        self.final_answers: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @classmethod
    def from_config(cls, config: Config) -> IngestReceipts:
        """KeysMissing / KeysCorrupt when the public keys cannot be read (checked at start)."""
        return cls(config.results_ingest_url, load_public_key_document(public_keys_file(config)),
                   config.results_ingest_timeout_s, config.results_ingest_connections_max)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def status(self, receipt_text: str, poll_final: Any) -> dict[str, Any]:
        """The receipt's status. `poll_final(poll)` awaits whether the poll's published
        results are final (PollNotFound for a poll never published)."""
        receipt = decode_receipt(receipt_text)  # ReceiptInvalid: 400
        final = await poll_final(receipt.poll)
        cached = self.final_answers.get(receipt_text)
        if cached is not None:
            self.final_answers.move_to_end(receipt_text)
            return cached
        public_key = self.public_keys.get(receipt.key_id)
        if public_key is None or not verify_receipt(receipt, public_key):
            return {"poll": receipt.poll, "shard": receipt.shard, "status": "not-counted",
                    "final": final, "option": receipt.option}
        answer = msgspec.to_builtins(await self._ask_ingest(receipt_text))
        if answer["final"]:
            self.final_answers[receipt_text] = answer
            if len(self.final_answers) > FINAL_ANSWERS_MAX:
                self.final_answers.popitem(last=False)
        return answer

    async def _ask_ingest(self, receipt_text: str) -> ReceiptAnswer:
        if self.in_flight.locked():
            raise Overloaded("too many receipt lookups in flight; retry shortly")
        url = f"{self.ingest_url}/v1/receipts/{quote(receipt_text, safe='')}"
        async with self.in_flight:
            try:
                response = await self.http.get(url)
            except httpx.HTTPError as exc:
                raise NotReady(f"the ingest role did not answer the lookup ({type(exc).__name__})"
                               "; retry shortly") from None
        if response.status_code != 200 or len(response.content) > INGEST_ANSWER_BYTES_MAX:
            raise NotReady(f"the ingest role answered the lookup with {response.status_code}; "
                           "retry shortly")
        try:
            return _answer_decoder.decode(response.content)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise NotReady(f"the ingest role's answer did not fit the schema ({exc})") from None


def cache_control(answer: dict[str, Any]) -> str:
    return FINAL_CACHE_CONTROL if answer["final"] else PROVISIONAL_CACHE_CONTROL
