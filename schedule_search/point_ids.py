"""A compact set of point ids, so that finding duplicate points costs 8 bytes a point, not a string."""

from __future__ import annotations

from array import array

ID_DIGITS = 12  # contracts.spec's spec_hash: 12 hex digits, 48 bits
BUCKET_BITS = 12  # 4,096 buckets by the id's first 3 digits (uniform: the ids are SHA-256 prefixes)


class PointIdSet:
    """The point ids seen so far, each kept as one 8-byte integer in the array of its first digits.

    A set of 200,000 id strings holds ~25 MB of objects; this holds ~2 MB, and a lookup scans one
    bucket of ~50 integers (in C) at that size. Ids that are not a spec hash go to a plain set.
    """

    def __init__(self) -> None:
        self._buckets = [array("Q") for _ in range(1 << BUCKET_BITS)]
        self._others: set[str] = set()
        self._count = 0

    def add(self, point_id: str) -> bool:
        """Add `point_id`; False if it was already in the set."""
        value = _as_int(point_id)
        if value is None:
            if point_id in self._others:
                return False
            self._others.add(point_id)
            self._count += 1
            return True
        bucket = self._buckets[value >> (4 * ID_DIGITS - BUCKET_BITS)]
        if value in bucket:
            return False
        bucket.append(value)
        self._count += 1
        return True

    def __contains__(self, point_id: str) -> bool:
        value = _as_int(point_id)
        if value is None:
            return point_id in self._others
        return value in self._buckets[value >> (4 * ID_DIGITS - BUCKET_BITS)]

    def __len__(self) -> int:
        return self._count


def _as_int(point_id: str) -> int | None:
    if len(point_id) != ID_DIGITS:
        return None
    try:
        return int(point_id, 16)
    except ValueError:
        return None
