"""Kafka transactions per second on the local stack, by producers and retry wait.

What bounds the engine's Kafka WAL on one machine is how many transactions the brokers
commit per second and what each costs them. This bench runs, on a private stack
(deploy/local/stack.py, 3 brokers, RF 3, min ISR 2), P transactional producers (one per
partition, as the engine has one per shard), each committing back-to-back one-record
transactions with acks=all, exactly the calls shards/kafka_wal.py makes (begin, send_batch,
commit). Each case runs once with aiokafka's own wait between a CONCURRENT_TRANSACTIONS
answer and the next AddPartitionsToTxn (20 ms) and once with the engine's
(`kafka_transaction_retry_ms`, 2 ms), side by side after a common warm-up (a fresh stack's
JVMs spend their first minute compiling). It prints transactions/s, the send and commit
times, and the brokers' CPU per transaction, and writes perf/results/kafka_transactions.json.

    python -m perf.bench_kafka_transactions [--producers 1,8] [--duration-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from perf import RESULTS_DIR
from perf.cpu_sampling import CpuSampler
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.private_stack import PrivateStack
from shards.kafka_wal import set_transaction_retry

AIOKAFKA_RETRY_MS = 20.0  # aiokafka's BACKOFF_OVERRIDE
ENGINE_RETRY_MS = 2.0  # engine/config.py kafka_transaction_retry_ms
RECORD_BYTES = 600  # about one batch record of the engine's at ~100 votes


async def producer_loop(bootstrap: str, topic: str, index: int, partitions: int,
                        stop_s: float, times: list[tuple[float, float]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"bench-txn-{index}",
                                acks="all", enable_idempotence=True, linger_ms=0)
    await producer.start()
    payload = os.urandom(RECORD_BYTES)
    try:
        while time.monotonic() < stop_s:
            started = time.monotonic()
            await producer.begin_transaction()
            batch = producer.create_batch()
            batch.append(key=None, value=payload, timestamp=None)
            await (await producer.send_batch(batch, topic, partition=index % partitions))
            sent = time.monotonic()
            await producer.commit_transaction()
            times.append((sent - started, time.monotonic() - sent))
    finally:
        await producer.stop()


async def run_case(bootstrap: str, topic: str, producers: int, partitions: int,
                   duration_s: float, broker_pids: list[int], retry_ms: float) -> dict:
    set_transaction_retry(retry_ms)
    times: list[tuple[float, float]] = []
    sampler = CpuSampler({"brokers": broker_pids, "client": os.getpid()}).start()
    started = time.monotonic()
    await asyncio.gather(*(producer_loop(bootstrap, topic, index, partitions,
                                         started + duration_s, times)
                           for index in range(producers)))
    elapsed_s = time.monotonic() - started
    cpu = sampler.stop()
    transactions_per_s = len(times) / elapsed_s
    sends = sorted(send for send, _ in times)
    commits = sorted(commit for _, commit in times)
    brokers_percent = cpu.cpu_percent["brokers"]
    return {
        "producers": producers,
        "retry_ms": retry_ms,
        "transactions": len(times),
        "transactions_per_s": round(transactions_per_s, 1),
        "send_ms_p50": round(1e3 * sends[len(sends) // 2], 2),
        "send_ms_p99": round(1e3 * sends[int(len(sends) * 0.99)], 2),
        "commit_ms_p50": round(1e3 * commits[len(commits) // 2], 2),
        "commit_ms_p99": round(1e3 * commits[int(len(commits) * 0.99)], 2),
        "brokers_cpu_percent": brokers_percent,
        "client_cpu_percent": cpu.cpu_percent["client"],
        "brokers_cpu_ms_per_transaction": round(10 * brokers_percent / transactions_per_s, 2),
        "machine_busy_percent": cpu.machine_busy_percent,
    }


async def measure(args, stack: PrivateStack) -> list[dict]:
    endpoints = stack.endpoints
    bootstrap = endpoints["kafka"]["bootstrap_servers"]
    topic = endpoints["kafka"]["wal_topic"]
    broker_pids = [pid for pid in stack.pids() if _is_broker(pid)]
    print(f"  warming the brokers up for {args.warmup_s:.0f} s", flush=True)
    await run_case(bootstrap, topic, max(args.producers), args.partitions, args.warmup_s,
                   broker_pids, ENGINE_RETRY_MS)
    rows = []
    for producers in args.producers:
        for retry_ms in (AIOKAFKA_RETRY_MS, ENGINE_RETRY_MS):
            row = await run_case(bootstrap, topic, producers, args.partitions, args.duration_s,
                                 broker_pids, retry_ms)
            print(f"  {producers} producers, retry {retry_ms:g} ms: "
                  f"{row['transactions_per_s']:,.1f} transactions/s", flush=True)
            rows.append(row)
    return rows


def _is_broker(pid: int) -> bool:
    try:
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", default="1,8", help="comma-separated producer counts")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=40.0)
    parser.add_argument("--stack-base-port", type=int, default=19600)
    parser.add_argument("--out", type=Path,
                        default=RESULTS_DIR / "kafka_transactions.json")
    args = parser.parse_args(argv)
    args.producers = [int(count) for count in args.producers.split(",")]
    conditions = describe_machine(("aiokafka",))
    print_conditions(conditions, {k: v for k, v in vars(args).items() if k != "out"})
    stack = PrivateStack(args.stack_base_port, args.partitions,
                         Path("/var/tmp/votes-bench") / "kafka-transactions-stack.log")
    try:
        stack.up()
        rows = asyncio.run(measure(args, stack))
    finally:
        stack.down()
    print_table(["producers", "retry ms", "txn/s", "send p50/p99 ms", "commit p50/p99 ms",
                 "brokers CPU", "brokers CPU ms/txn"],
                [[str(r["producers"]), f"{r['retry_ms']:g}", f"{r['transactions_per_s']:,.1f}",
                  f"{r['send_ms_p50']} / {r['send_ms_p99']}",
                  f"{r['commit_ms_p50']} / {r['commit_ms_p99']}",
                  f"{r['brokers_cpu_percent']:.0f}%", f"{r['brokers_cpu_ms_per_transaction']}"]
                 for r in rows])
    write_json(args.out, {"conditions": conditions,
                          "parameters": {k: v for k, v in vars(args).items() if k != "out"},
                          "cases": rows,
                          "median_transactions_per_s": statistics.median(
                              r["transactions_per_s"] for r in rows)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
