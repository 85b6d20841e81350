"""Pure-Python twin of engine/_fastpath.pyx: the reference semantics, vote by vote.

Same signatures and results as the compiled module; used where the extension is not built
and by the parity test as the model the compiled code must match.
"""

from __future__ import annotations

import array

from pyroaring import BitMap


def grow_locator(locator: array.array, size_needed: int) -> None:
    current = len(locator)
    if current >= size_needed:
        return
    target = max(size_needed, current + current // 2, 1024)
    locator.frombytes(bytes(8 * (target - current)))


def apply_group(
    voters_bitmap: BitMap,
    tallies: array.array,
    locator: array.array,
    voters_bytes: bytes,
    options_bytes: bytes,
    locator_value: int,
) -> tuple[int, bytearray]:
    voters = array.array("I", voters_bytes)
    options = array.array("H", options_bytes)
    if len(voters) != len(options):
        raise ValueError("voters and options differ in length")
    flags = bytearray(len(voters))
    if voters:
        grow_locator(locator, max(voters) + 1)
    option_count = len(tallies)
    counted = 0
    for index, voter in enumerate(voters):
        option = options[index]
        if option >= option_count or voter in voters_bitmap:
            continue
        voters_bitmap.add(voter)
        tallies[option] += 1
        locator[voter] = locator_value
        flags[index] = 1
        counted += 1
    return counted, flags
