"""PNG plots of perf/results/peers.json (matplotlib, Agg backend: no display needed).

- peers_throughput.png: 201/s per peer for the closed-loop scenarios (max throughput, 30%
  repeat votes, 16 polls), with each peer's durability in its label;
- peers_latency.png: open-loop latency percentiles at half of each peer's max rate (log
  scale; latency from each request's intended send time);
- peers_over_time.png: 201/s per second of the closed-loop max run, and the burst at a
  poll's opening (201/s per second, and p99 of the requests scheduled in each second).

    python -m perf.plots [perf/results/peers.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from perf import RESULTS_DIR

CLOSED_SCENARIOS = (("closed_max", "max, 1 poll"), ("repeat_votes", "30% repeats"),
                    ("many_polls", "16 polls"))  # fmt: skip
PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")


def _subtitle(document: dict) -> str:
    c = document["conditions"]
    return (f"{c['cpu_model']}, {c['cores_usable']} cores, {c['time_utc']}, commit "
            f"{(c.get('git') or {}).get('commit')}; generator on the same machine")


def _scenario(peer: dict, name: str) -> dict | None:
    return peer.get("scenarios", {}).get(name)


def plot_throughput(document: dict, out: Path) -> Path:
    peers = document["peers"]
    names = list(peers)
    fig, ax = plt.subplots(figsize=(max(11, 2.2 * len(names)), 6))
    width = 0.8 / len(CLOSED_SCENARIOS)
    for index, (scenario, label) in enumerate(CLOSED_SCENARIOS):
        values = [(_scenario(peers[n], scenario) or {}).get("created_per_s", 0) for n in names]
        positions = [i + (index - (len(CLOSED_SCENARIOS) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(positions, values, width, label=label)
        for bar, value in zip(bars, values):
            if value:
                ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value),
                            ha="center", va="bottom", fontsize=7, rotation=90)  # fmt: skip
    ax.set_xticks(range(len(names)))
    labels = [f"{n}\n" + peers[n]["durability"].replace(": ", ":\n", 1) for n in names]
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("201 responses per second (closed loop, wrk)")
    ax.set_title("Votes per second: engine, ceiling and peers\n" + _subtitle(document), fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    path = out / "peers_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(document: dict, out: Path) -> Path:
    peers = document["peers"]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for name, peer in peers.items():
        result = _scenario(peer, "open_half")
        if not result or not result.get("latency_us"):
            continue
        values = [result["latency_us"][p] / 1000 for p in PERCENTILES]
        ax.plot(PERCENTILES, values, marker="o",
                label=f"{name} @ {result['created_per_s']:,.0f}/s")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("latency from intended send time, ms (log)")
    ax.set_xlabel("percentile")
    ax.set_title("Open loop at half of each peer's max rate\n" + _subtitle(document), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "peers_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_over_time(document: dict, out: Path) -> Path:
    peers = document["peers"]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 11))
    for name, peer in peers.items():
        closed = _scenario(peer, "closed_max")
        series = (closed or {}).get("series")
        if series and series.get("created"):
            # wrk's first and last seconds are partial (wall-clock seconds): drop them.
            created = series["created"][1:-1] or series["created"]
            top.plot(range(1, len(created) + 1), created, marker=".", label=name)
        burst = _scenario(peer, "burst_opening")
        if burst and burst.get("series"):
            s = burst["series"]
            middle.plot(s["second"], s["created"], marker=".", label=name)
            p99 = [(v / 1000 if v is not None else None) for v in s["latency_p99_us"]]
            bottom.plot(s["second"], p99, marker=".", label=name)
    top.set_title("201/s per second, closed loop max (wrk)\n" + _subtitle(document), fontsize=9)
    top.set_ylabel("201/s")
    top.set_xlabel("second of the run")
    middle.set_title("Burst at poll opening (open loop): 201/s per second", fontsize=9)
    middle.set_ylabel("201/s")
    bottom.set_title("Burst at poll opening: p99 latency of requests scheduled in each second",
                     fontsize=9)  # fmt: skip
    bottom.set_ylabel("ms (log)")
    bottom.set_yscale("log")
    bottom.set_xlabel("second since the poll opened")
    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "peers_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_peers(document: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [plot_throughput(document, out), plot_latency(document, out),
            plot_over_time(document, out)]  # fmt: skip


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else RESULTS_DIR / "peers.json"
    for written in plot_peers(json.loads(path.read_text()), path.parent):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
