"""A per-process cache of clients' tensors, bounded by bytes rather than by count.

A simulation worker serves many partitions, round after round. ``functools.lru_cache`` with a
count limit fits one federation size only: 256 entries hold a 100-client run of 600 images each,
but a federation of 1,000 one-batch clients (a few MB in all) cycles through the cache and
reloads every client on every call, while 256 CIFAR clients of a big partition could hold
gigabytes. Budgeting bytes keeps every client that fits in memory, whatever its size.

    FEDREP_CLIENT_CACHE_MB   bytes budget per process, in MiB (default 1024)
    FEDREP_CLIENT_CACHE      optional cap on the number of clients (default: none)
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
DEFAULT_BUDGET_MB = 1024


def tensor_bytes(value: object) -> int:
    """Bytes held by the tensors among a dataclass's fields (the cache's measure of a client)."""
    return sum(v.element_size() * v.nelement() for f in fields(value)  # type: ignore[arg-type]
               if isinstance(v := getattr(value, f.name), torch.Tensor))


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


class ByteBudgetCache(Generic[T]):
    """Least-recently-used cache of ``load(*key)`` whose entries together stay within
    ``max_bytes`` (one entry larger than the budget is returned but not kept) and, if given,
    ``max_entries``. Thread-safe; ``load`` runs outside the lock."""

    def __init__(self, load: Callable[..., T], max_bytes: int, max_entries: int = 0,
                 size: Callable[[T], int] = tensor_bytes) -> None:
        self._load, self._size = load, size
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.Lock()

    def __call__(self, *key: Hashable) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self._hits += 1
                return self._entries[key][0]
            self._misses += 1
        value = self._load(*key)
        size = self._size(value)
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self._bytes += size
                while self._entries and (self._bytes > self.max_bytes or
                                         0 < self.max_entries < len(self._entries)):
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return value

    def cache_clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = self._hits = self._misses = 0

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)


def budget_from_env() -> tuple[int, int]:
    """(bytes, entries) from ``FEDREP_CLIENT_CACHE_MB`` and ``FEDREP_CLIENT_CACHE``; a value that
    is not a non-negative integer fails here, naming the variable."""
    values = {}
    for name, default in (("FEDREP_CLIENT_CACHE_MB", DEFAULT_BUDGET_MB), ("FEDREP_CLIENT_CACHE", 0)):
        raw = os.environ.get(name, "")
        try:
            values[name] = int(raw) if raw.strip() else default
        except ValueError:
            values[name] = -1
        if values[name] < 0:
            raise ValueError(f"{name}={raw!r}: expected a whole number >= 0 "
                             f"({'MiB per process' if name.endswith('_MB') else 'clients, 0 = no cap'})")
    return values["FEDREP_CLIENT_CACHE_MB"] << 20, values["FEDREP_CLIENT_CACHE"]
