"""Host-memory tier: validated adapter weights kept under a byte budget, least recently used out first.

Engine slots are few and fixed; this tier makes re-loading an evicted adapter a copy into a slot
instead of a disk read and a re-validation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from adaptgate.adapters.format import AdapterWeights
from adaptgate.adapters.refs import AdapterRef


class WeightsCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[AdapterRef, AdapterWeights] = OrderedDict()
        self._published: dict[AdapterRef, float | None] = {}  # which publish of the version each entry holds
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, ref: AdapterRef, published: float | None = None) -> AdapterWeights | None:
        """`published` (the record's `created_at`): an entry from another publish of the same version
        number (its name deleted and published again, perhaps by another replica) is dropped, not returned."""
        with self._lock:
            weights = self._items.get(ref)
            if weights is not None and published is not None and self._published.get(ref) != published:
                self._pop(ref)
                return None
            if weights is not None:
                self._items.move_to_end(ref)
            return weights

    def put(self, ref: AdapterRef, weights: AdapterWeights, published: float | None = None) -> int:
        """Returns how many entries were evicted to make room; an entry over the whole budget is not kept."""
        size = weights.size_bytes
        if size > self.budget_bytes:
            return 0
        evicted = 0
        with self._lock:
            if ref in self._items:
                return 0
            while self._bytes + size > self.budget_bytes and self._items:
                self._pop(next(iter(self._items)))
                evicted += 1
            self._items[ref] = weights
            self._published[ref] = published
            self._bytes += size
        return evicted

    def _pop(self, ref: AdapterRef) -> AdapterWeights | None:
        """Under the lock."""
        weights = self._items.pop(ref, None)
        self._published.pop(ref, None)
        if weights is not None:
            self._bytes -= weights.size_bytes
        return weights

    def discard(self, ref: AdapterRef) -> bool:
        """A deleted version's weights must never serve a later version of the same number; False if absent."""
        with self._lock:
            return self._pop(ref) is not None
