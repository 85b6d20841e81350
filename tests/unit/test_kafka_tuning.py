"""Proves that the aiokafka knob shards/kafka_wal.set_transaction_retry turns still exists
and is the one its handler reads: a CONCURRENT_TRANSACTIONS answer to AddPartitionsToTxn
between two transactions is retried after exactly that wait (the engine's Kafka throughput
depends on it, docs/performance.md)."""

from __future__ import annotations

import aiokafka.producer.sender as sender
from aiokafka.errors import ConcurrentTransactions

from shards.kafka_wal import set_transaction_retry


class _TxnManager:
    txn_partitions: set = set()  # nothing added yet: the next transaction's first partition


class _Sender:
    _retry_backoff = 0.1
    _txn_manager = _TxnManager()


class _Response:
    errors = [("votes-wal", [(0, ConcurrentTransactions.errno)])]


def test_the_retry_between_transactions_is_ours() -> None:
    original = sender.BACKOFF_OVERRIDE
    try:
        set_transaction_retry(2.0)
        handler = sender.AddPartitionsToTxnHandler(_Sender(), [])
        assert handler.handle_response(_Response()) == 0.002
        set_transaction_retry(20.0)
        assert handler.handle_response(_Response()) == 0.02
    finally:
        sender.BACKOFF_OVERRIDE = original
