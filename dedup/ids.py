"""Sample identifiers: `sample_id = shard_index << 32 | position in the shard` (failed samples count)."""

SAMPLE_ID_SHIFT = 32


def make_sample_id(shard_index: int, position: int) -> int:
    return (shard_index << SAMPLE_ID_SHIFT) | position


def split_sample_id(sample_id: int) -> tuple[int, int]:
    return sample_id >> SAMPLE_ID_SHIFT, sample_id & ((1 << SAMPLE_ID_SHIFT) - 1)
