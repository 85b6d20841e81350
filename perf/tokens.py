"""Real voter tokens for the load, minted with `votes token` from one key directory.

Every peer verifies the same tokens (each engine data dir gets a copy of the keys they were
minted with), and within one peer no voter repeats unless a scenario asks for repeats.
"""

from __future__ import annotations

import math
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from perf import BenchError

VENV_BIN = Path(sys.executable).parent
MINT_TIMEOUT_S = 1800.0  # one `votes token` process minting its share of a large file


class TokenPool:
    """Real voter tokens minted with `votes token` from one key directory, used in order.

    Every peer starts with fresh state, so every peer starts again at the first voter
    (``rewind``): all peers see the same tokens. Within a peer each request file takes
    the next unused voters, so no voter repeats unless a scenario asks for repeats.
    """

    def __init__(self, keys_data_dir: Path, work_dir: Path, mint_procs: int, ttl_s: int,
                 votes_bin: Path = VENV_BIN / "votes"):  # fmt: skip
        self.votes_bin = votes_bin
        self.keys_data_dir = keys_data_dir
        self.work_dir = work_dir
        self.mint_procs = mint_procs
        self.ttl_s = ttl_s
        self.tokens: list[bytes] = []
        self.cursor = 0
        self.files = 0
        self.mint_s = 0.0

    def rewind(self) -> None:
        self.cursor = 0

    def _mint(self, count: int) -> None:
        """Mint ``count`` more tokens (voters len+1 ..), split over processes."""
        started = time.monotonic()
        first = len(self.tokens) + 1
        procs = max(1, min(self.mint_procs, count // 50_000 + 1))
        share = math.ceil(count / procs)
        running = []
        for index in range(procs):
            start = first + index * share
            n = min(share, first + count - start)
            if n <= 0:
                break
            argv = [str(self.votes_bin), "token", "--data-dir", str(self.keys_data_dir),
                    "--voter", str(start), "--count", str(n), "--ttl-s", str(self.ttl_s)]  # fmt: skip
            running.append((argv, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)))  # fmt: skip
        for argv, proc in running:
            out, err = proc.communicate(timeout=MINT_TIMEOUT_S)
            if proc.returncode != 0:
                raise BenchError(f"`{shlex.join(argv)}` exited {proc.returncode}: {err.decode()}")
            self.tokens.extend(out.split())
        if len(self.tokens) != first - 1 + count:
            raise BenchError(f"minted {len(self.tokens) - first + 1} tokens, expected {count}")
        self.mint_s += time.monotonic() - started

    def _next(self, count: int) -> list[bytes]:
        if self.cursor + count > len(self.tokens):
            self._mint(self.cursor + count - len(self.tokens))
        taken = self.tokens[self.cursor : self.cursor + count]
        self.cursor += count
        return taken

    def _write(self, lines: list[bytes], purpose: str) -> Path:
        self.files += 1
        path = self.work_dir / f"{self.files:03d}-{purpose}.tokens"
        with open(path, "wb") as out:
            out.write(b"\n".join(lines) + b"\n")
        return path

    def take(self, count: int, purpose: str) -> Path:
        """A file of ``count`` tokens of voters not used yet by this peer."""
        return self._write(self._next(count), purpose)

    def take_with_repeats(self, count: int, share: float, gap: int, seed: int, purpose: str):
        """``count`` lines; after the first ``gap``, each line repeats (with probability
        ``share``) a voter from at least ``gap`` lines earlier, so that voter's first vote
        has most likely been answered. Returns (path, line numbers of the repeats)."""
        rng = random.Random(seed)
        distinct = self._next(math.ceil(count * (1 - share)) + gap + 1)
        lines: list[bytes] = []
        repeat_positions: list[int] = []
        next_distinct = 0
        while len(lines) < count and next_distinct < len(distinct):
            if len(lines) > gap and rng.random() < share:
                repeat_positions.append(len(lines))
                lines.append(lines[rng.randrange(0, len(lines) - gap)])
            else:
                lines.append(distinct[next_distinct])
                next_distinct += 1
        return self._write(lines, purpose), repeat_positions
