import array

from pyroaring import BitMap

def grow_locator(locator: array.array, size_needed: int) -> None: ...
def apply_group(
    voters_bitmap: BitMap,
    tallies: array.array,
    locator: array.array,
    voters_bytes: bytes,
    options_bytes: bytes,
    locator_value: int,
) -> tuple[int, bytearray]: ...
