"""Kafka transactions per second on the local stack, by producers, partitions per transaction
and retry wait.

What bounds the engine's Kafka WAL on one machine is how many transactions the brokers
commit per second and what each costs them. This bench runs, on a private stack
(deploy/local/stack.py, 3 brokers, RF 3, min ISR 2), P transactional producers (one per
fencing group, as the engine has one per group, `wal-g<g>`), each committing back-to-back
transactions with acks=all, exactly the calls shards/kafka_wal.py makes (begin,
send_batch, commit).

The sweep `--partitions-per-transaction 1,4,16,64` compares the two Kafka layouts of a
fencing group: one partition per group (K = 1: the group's records in one batch on one
partition) against one partition per shard written in the group's one transaction (K =
shards per group: one batch on each of K partitions). A transaction over K partitions costs
the coordinator an AddPartitionsToTxn and a transaction-log entry naming K partitions, and
at the commit one marker (a control batch, replicated like any batch) on each of the K
partitions. Each producer owns its own K partitions (producer i writes partitions
i*K .. i*K+K-1), as groups own disjoint shards. `--bytes-modes` says what the transaction
carries: `split` (the same `--record-bytes` in all, split over the K records: the same votes
per cycle, laid out two ways) and `each` (`--record-bytes` on every partition: K times the
bytes). Every case runs after one common warm-up (a fresh stack's JVMs spend their first
minute compiling), for `--duration-s` each, side by side in one run. With `--retry-ms 20,2`
each case also runs with aiokafka's own wait between a CONCURRENT_TRANSACTIONS answer and
the next AddPartitionsToTxn (20 ms) beside the engine's (`kafka_transaction_retry_ms`, 2 ms).

It prints the conditions, then per case transactions/s, records/s, the send and commit
times, and the brokers' CPU per transaction and per record, and writes
perf/results/kafka_transactions.json (perf/capacity.py reads it).

    python -m perf.bench_kafka_transactions [--producers 4] [--partitions-per-transaction 1,4,16,64]
        [--bytes-modes split,each] [--duration-s 8] [--warmup-s 40] [--retry-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from perf import RESULTS_DIR, BenchError
from perf.cpu_sampling import CpuSampler
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.private_stack import PrivateStack
from shards.kafka_wal import set_transaction_retry

AIOKAFKA_RETRY_MS = 20.0  # aiokafka's BACKOFF_OVERRIDE
ENGINE_RETRY_MS = 2.0  # engine/config.py kafka_transaction_retry_ms
RECORD_BYTES = 600  # about one batch record of the engine's at ~100 votes
# Every wait on the brokers has a bound: a case whose transaction takes longer than this
# has a stuck stack, not a figure.
TRANSACTION_TIMEOUT_S = 30.0
BYTES_MODES = ("split", "each")


def payload_bytes(record_bytes: int, partitions_per_transaction: int, bytes_mode: str) -> int:
    """Bytes of each of a transaction's K records: all of them each, or a K-th share."""
    if bytes_mode == "each":
        return record_bytes
    return max(1, record_bytes // partitions_per_transaction)


async def one_transaction(producer: AIOKafkaProducer, topic: str, partitions: range,
                          payload: bytes) -> tuple[float, float]:
    """Begin, one batch of one record per partition, commit; (send s, commit s)."""
    started = time.monotonic()
    await producer.begin_transaction()
    sent = []
    for partition in partitions:
        batch = producer.create_batch()
        batch.append(key=None, value=payload, timestamp=None)
        sent.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*sent)
    delivered = time.monotonic()
    await producer.commit_transaction()
    return delivered - started, time.monotonic() - delivered


async def producer_loop(bootstrap: str, topic: str, index: int, partitions: range,
                        payload: bytes, stop_s: float, times: list[tuple[float, float]]) -> int:
    """Transactions back to back until ``stop_s``; 1 if one stalled (this producer stops), else 0."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"bench-txn-{index}",
                                acks="all", enable_idempotence=True, linger_ms=0)
    await producer.start()
    try:
        while time.monotonic() < stop_s:
            async with asyncio.timeout(TRANSACTION_TIMEOUT_S):
                times.append(await one_transaction(producer, topic, partitions, payload))
    except TimeoutError:
        # A stalled transaction (a starved broker out of the ISR) is reported with the
        # case, not turned into a figure; the producer's state is unknown, so it stops.
        return 1
    finally:
        async with asyncio.timeout(TRANSACTION_TIMEOUT_S):
            await producer.stop()
    return 0


def percentile_ms(sorted_s: list[float], fraction: float) -> float:
    return round(1e3 * sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * fraction))], 2)


async def run_case(bootstrap: str, topic: str, case: dict, duration_s: float,
                   broker_pids: list[int], stack_pids: list[int]) -> dict:
    """One case: ``producers`` producers, ``partitions_per_transaction`` partitions each."""
    set_transaction_retry(case["retry_ms"])
    count = case["partitions_per_transaction"]
    payload = os.urandom(case["record_bytes"])
    times: list[tuple[float, float]] = []
    # The stack's services are children of this process: "client" minus "stack" is the
    # producers' own CPU.
    sampler = CpuSampler({"brokers": broker_pids, "stack": stack_pids,
                          "client": os.getpid()}).start()
    started = time.monotonic()
    stalled = await asyncio.gather(*(producer_loop(bootstrap, topic, index,
                                                   range(index * count, (index + 1) * count),
                                                   payload, started + duration_s, times)
                                     for index in range(case["producers"])))
    elapsed_s = time.monotonic() - started
    cpu = sampler.stop()
    if not times:
        raise BenchError(f"no transaction committed in {elapsed_s:.0f} s: {case}")
    return {**summarize(case, times, elapsed_s, cpu), "producers_stalled": sum(stalled)}


def summarize(case: dict, times: list[tuple[float, float]], elapsed_s: float, cpu) -> dict:
    transactions_per_s = len(times) / elapsed_s
    records_per_s = transactions_per_s * case["partitions_per_transaction"]
    sends = sorted(send for send, _ in times)
    commits = sorted(commit for _, commit in times)
    totals = sorted(send + commit for send, commit in times)
    brokers_percent = cpu.cpu_percent["brokers"]
    # percent of a core = 10 ms of CPU per second.
    cpu_ms_per_s = 10 * brokers_percent
    return {
        **case,
        "transactions": len(times),
        "transactions_per_s": round(transactions_per_s, 1),
        "records_per_s": round(records_per_s, 1),
        "bytes_per_transaction": case["record_bytes"] * case["partitions_per_transaction"],
        "send_ms_p50": percentile_ms(sends, 0.5),
        "send_ms_p99": percentile_ms(sends, 0.99),
        "commit_ms_p50": percentile_ms(commits, 0.5),
        "commit_ms_p99": percentile_ms(commits, 0.99),
        "transaction_ms_p50": percentile_ms(totals, 0.5),
        "transaction_ms_p99": percentile_ms(totals, 0.99),
        "brokers_cpu_percent": brokers_percent,
        "client_cpu_percent": round(max(0.0, cpu.cpu_percent["client"] - cpu.cpu_percent["stack"]), 1),
        "brokers_cpu_ms_per_transaction": round(cpu_ms_per_s / transactions_per_s, 3),
        "brokers_cpu_ms_per_record": round(cpu_ms_per_s / records_per_s, 3),
        "machine_busy_percent": cpu.machine_busy_percent,
    }


def cases_of(args) -> list[dict]:
    """Every case of the sweep, in run order (K = 1 is the same in both bytes modes: once)."""
    cases = []
    for producers in args.producers:
        for count in args.partitions_per_transaction:
            for bytes_mode in (args.bytes_modes if count > 1 else args.bytes_modes[:1]):
                for retry_ms in args.retry_ms:
                    cases.append({"producers": producers, "partitions_per_transaction": count,
                                  "bytes_mode": bytes_mode, "retry_ms": retry_ms,
                                  "record_bytes": payload_bytes(args.record_bytes, count, bytes_mode)})
    return cases


async def measure(args, stack: PrivateStack) -> list[dict]:
    endpoints = stack.endpoints
    bootstrap = endpoints["kafka"]["bootstrap_servers"]
    topic = endpoints["kafka"]["wal_topic"]
    stack_pids = stack.pids()
    broker_pids = [pid for pid in stack_pids if _is_broker(pid)]
    print(f"  warming the brokers up for {args.warmup_s:.0f} s", flush=True)
    # The warm-up runs a middle case: the largest one (producers x 64 partitions) starves
    # the brokers of a 2-core machine while their JVMs are still compiling.
    middle = sorted(args.partitions_per_transaction)[len(args.partitions_per_transaction) // 2]
    warmup = {"producers": max(args.producers), "retry_ms": ENGINE_RETRY_MS,
              "partitions_per_transaction": middle,
              "bytes_mode": "split", "record_bytes": args.record_bytes}
    await run_case(bootstrap, topic, warmup, args.warmup_s, broker_pids, stack_pids)
    rows = []
    for case in cases_of(args):
        row = await run_case(bootstrap, topic, case, args.duration_s, broker_pids, stack_pids)
        print(f"  {case['producers']} producers, {case['partitions_per_transaction']} partitions "
              f"per transaction ({case['bytes_mode']}, {case['record_bytes']} B each), retry "
              f"{case['retry_ms']:g} ms: {row['transactions_per_s']:,.1f} transactions/s, "
              f"{row['brokers_cpu_ms_per_transaction']} ms broker CPU each"
              + (f", {row['producers_stalled']} producers stalled" if row["producers_stalled"] else ""),
              flush=True)
        rows.append(row)
    return rows


def _is_broker(pid: int) -> bool:
    try:
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def counts(text: str) -> list[int]:
    return [int(count) for count in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=counts, default=[4],
                        help="comma-separated producer counts (default 4)")
    parser.add_argument("--partitions-per-transaction", type=counts, default=[1, 4, 16, 64],
                        help="comma-separated partitions each transaction writes (default 1,4,16,64)")
    parser.add_argument("--bytes-modes", type=lambda text: text.split(","), default=list(BYTES_MODES),
                        help="split: --record-bytes over the K records; each: on every record")
    parser.add_argument("--record-bytes", type=int, default=RECORD_BYTES)
    parser.add_argument("--retry-ms", type=lambda text: [float(v) for v in text.split(",")],
                        default=[ENGINE_RETRY_MS], help="e.g. 20,2: aiokafka's and the engine's")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--warmup-s", type=float, default=40.0)
    parser.add_argument("--stack-base-port", type=int,
                        default=int(os.environ.get("VOTES_STACK_BASE_PORT", "19600")))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kafka_transactions.json")
    args = parser.parse_args(argv)
    unknown = set(args.bytes_modes) - set(BYTES_MODES)
    if unknown or min(args.producers + args.partitions_per_transaction) < 1:
        parser.error(f"bytes modes are {', '.join(BYTES_MODES)}; counts must be at least 1")
    # Each producer owns its own K partitions, as fencing groups own disjoint shards.
    args.partitions = max(args.producers) * max(args.partitions_per_transaction)
    return args


def print_rows(rows: list[dict]) -> None:
    print_table(["producers", "K", "bytes", "retry ms", "txn/s", "records/s", "send p50/p99 ms",
                 "commit p50/p99 ms", "brokers CPU", "CPU ms/txn", "CPU ms/record"],
                [[str(r["producers"]), str(r["partitions_per_transaction"]),
                  f"{r['bytes_mode']} {r['record_bytes']}", f"{r['retry_ms']:g}",
                  f"{r['transactions_per_s']:,.1f}", f"{r['records_per_s']:,.0f}",
                  f"{r['send_ms_p50']} / {r['send_ms_p99']}",
                  f"{r['commit_ms_p50']} / {r['commit_ms_p99']}",
                  f"{r['brokers_cpu_percent']:.0f}%", f"{r['brokers_cpu_ms_per_transaction']}",
                  f"{r['brokers_cpu_ms_per_record']}"]
                 for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parameters = {k: v for k, v in vars(args).items() if k != "out"}
    conditions = describe_machine(("aiokafka",))
    print_conditions(conditions, parameters)
    stack = PrivateStack(args.stack_base_port, args.partitions,
                         Path("/var/tmp/votes-bench") / "kafka-transactions-stack.log")
    try:
        stack.up()
        rows = asyncio.run(measure(args, stack))
    finally:
        stack.down()
    print_rows(rows)
    write_json(args.out, {"conditions": conditions, "parameters": parameters, "cases": rows,
                          "median_transactions_per_s": statistics.median(
                              r["transactions_per_s"] for r in rows)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
