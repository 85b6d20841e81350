"""The capacity model's results fan-out section (issue 13), apart from perf/capacity.py so
that file stays within its size bounds: how many results processes and instances hold
`fanout_viewers` SSE viewers directly, and how many behind a CDN that collapses the SSE
streams of one poll at each edge into one origin stream.

Inputs are (value, unit, source) triples that perf/capacity.py turns into its Figures; the
streams one process holds and the memory per stream come from perf/results/fanout.json
(perf/bench_results_fanout.py) when a step of it delivered, else the defaults below, named
as such. The section reads and writes through the Model's `i` and `put`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Defaults until perf/results/fanout.json exists: bench_results_fanout, 2026-12-02 16:31Z.
FANOUT_SUBSCRIBERS_DEFAULT = 2_500
FANOUT_BYTES_DEFAULT = 32_000
ASSUMPTION = "assumption"

FANOUT_INPUTS: dict[str, tuple[float, str, str]] = {
    "fanout_viewers": (10_000_000, "viewers", ASSUMPTION + ": issue 13's example"),
    "sse_subscribers_per_process": (
        FANOUT_SUBSCRIBERS_DEFAULT, "streams", "default (bench_results_fanout 2026-12-02: "
        "p99 <= 250 ms at 10 updates/s on one core of the 2-core VM)"),
    "sse_bytes_per_subscriber": (
        FANOUT_BYTES_DEFAULT, "B", "default (bench_results_fanout 2026-12-02: RSS growth / streams)"),
    "results_vcpus_per_instance": (8, "vCPU", "c7i.2xlarge: 8 vCPU, 16 GiB; one process per vCPU"),
    "results_vcpus_reserved": (1, "vCPU", ASSUMPTION + ": OS, metrics, the Redis listener's peaks"),
    "results_instance_memory_gb": (16, "GB", "c7i.2xlarge"),
    "results_memory_budget": (0.7, "share", ASSUMPTION + ": streams may use 70 % of memory"),
    "cdn_streams_per_edge_per_poll": (1, "streams", ASSUMPTION + ": the CDN collapses one "
                                      "poll's SSE at each edge into one origin stream"),
}


def measured_fanout_figures(results_dir: Path) -> tuple[dict[str, tuple[float, str, str]], list[str]]:
    """Streams one results process held (p99 <= 250 ms, every update delivered) and its
    memory per stream from fanout.json, if a step delivered; and the file used."""
    fanout_path = results_dir / "fanout.json"
    try:
        fanout = json.loads(fanout_path.read_text())
    except (OSError, ValueError):
        return {}, []
    held, per_stream = fanout.get("subscribers_held_max"), fanout.get("rss_bytes_per_subscriber")
    if not held or not per_stream:
        return {}, []
    source = f"{fanout_path.name}: {fanout.get('parameters', {}).get('update_rate_per_s')} updates/s"
    return ({"sse_subscribers_per_process": (float(held), "streams", source),
             "sse_bytes_per_subscriber": (float(per_stream), "B", source)},
            [f"{fanout_path} (SSE streams per results process, bytes per stream)"])


def round_up_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def fanout_section(model: Any) -> None:
    """Results processes and instances for `fanout_viewers` SSE viewers, held directly or
    behind a CDN; a process measured on a core holds vcpu_share_of_core as much on a vCPU;
    an instance holds what its CPU or its memory allows, whichever is less; per AZ."""
    i, azs = model.i, int(model.i["azs"])
    s = "results fan-out (SSE)"
    per_process = model.put(s, "fanout_streams_per_vcpu_process",
                            math.floor(i["sse_subscribers_per_process"] * i["vcpu_share_of_core"]),
                            f"{i['sse_subscribers_per_process']:,.0f} per core x "
                            f"{i['vcpu_share_of_core']:g}")  # fmt: skip
    processes_per_instance = i["results_vcpus_per_instance"] - i["results_vcpus_reserved"]
    memory_bytes = i["results_instance_memory_gb"] * 1e9 * i["results_memory_budget"]
    by_memory = math.floor(memory_bytes / i["sse_bytes_per_subscriber"])
    per_instance = model.put(s, "fanout_streams_per_instance",
                             min(per_process * processes_per_instance, by_memory),
                             f"min(CPU {per_process:,} x {processes_per_instance:g} processes, "
                             f"memory {by_memory:,} = {memory_bytes / 1e9:.1f} GB / "
                             f"{i['sse_bytes_per_subscriber']:,.0f} B)")  # fmt: skip
    viewers = i["fanout_viewers"]
    model.put(s, "fanout_processes_direct", math.ceil(viewers / per_process),
              f"ceil({viewers:,.0f} viewers / {per_process:,})")  # fmt: skip
    model.put(s, "fanout_instances_direct", round_up_to(math.ceil(viewers / per_instance), azs),
              f"ceil({viewers:,.0f} / {per_instance:,.0f}) up to a multiple of {azs} AZs")  # fmt: skip
    origin = model.put(s, "fanout_origin_streams_with_cdn",
                       i["cdn_edge_locations"] * i["polls_concurrent"] * i["cdn_streams_per_edge_per_poll"],
                       f"{i['cdn_edge_locations']:g} edges x {i['polls_concurrent']:g} polls x "
                       f"{i['cdn_streams_per_edge_per_poll']:g} (the edges hold the viewers: "
                       f"{viewers / i['cdn_edge_locations']:,.0f} each)")  # fmt: skip
    model.put(s, "fanout_processes_with_cdn", math.ceil(origin / per_process),
              f"ceil({origin:,.0f} / {per_process:,})")  # fmt: skip
    model.put(s, "fanout_instances_with_cdn", round_up_to(max(1, math.ceil(origin / per_instance)), azs),
              f"ceil({origin:,.0f} / {per_instance:,.0f}), at least one per AZ")  # fmt: skip
