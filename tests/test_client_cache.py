"""The per-process client-data cache keeps clients by bytes, least recently used out."""

from __future__ import annotations

import pytest
import torch

from fedrep.config import parse_run_config
from fedrep.data import federated
from fedrep.data.client_cache import ByteBudgetCache, budget_from_env
from fedrep.data.federated import ClientData


def _client(n: int) -> ClientData:  # n float32 images of 10 values: 40n bytes (+ 8n labels) each split
    return ClientData(torch.zeros(n, 10), torch.zeros(n, dtype=torch.int64),
                      torch.zeros(n, 10), torch.zeros(n, dtype=torch.int64))


def test_keeps_what_fits_and_drops_the_least_recently_used():
    loads: list[int] = []
    cache = ByteBudgetCache(lambda n: loads.append(n) or _client(n), max_bytes=96 * 5)  # 96n a client
    cache(1), cache(2), cache(1), cache(2)
    assert loads == [1, 2] and cache.cache_info().bytes == 96 * 3
    cache(1)  # 1 is now the most recent, 2 the least
    cache(3)  # 96 * 6 bytes would exceed the budget: 2 goes
    info = cache.cache_info()
    assert (info.entries, info.bytes) == (2, 96 * 4)
    cache(1)
    assert loads == [1, 2, 3]  # 1 was kept
    cache(2)
    assert loads == [1, 2, 3, 2]  # 2 had been dropped
    too_big = cache(6)  # more than the whole budget: served, never kept
    assert too_big.num_train == 6 and cache(6) is not too_big and loads[-2:] == [6, 6]


def test_entry_cap_and_clear():
    cache = ByteBudgetCache(_client, max_bytes=1 << 20, max_entries=2)
    for n in (1, 2, 3):
        cache(n)
    assert cache.cache_info().entries == 2 and cache.cache_info().misses == 3
    cache(3)
    assert cache.cache_info().hits == 1
    cache.cache_clear()
    assert cache.cache_info() == type(cache.cache_info())(0, 0, 0, 0, 1 << 20)


def test_budget_from_env(monkeypatch):
    monkeypatch.delenv("FEDREP_CLIENT_CACHE", raising=False)
    monkeypatch.delenv("FEDREP_CLIENT_CACHE_MB", raising=False)
    assert budget_from_env() == (1024 << 20, 0)
    monkeypatch.setenv("FEDREP_CLIENT_CACHE_MB", "64")
    monkeypatch.setenv("FEDREP_CLIENT_CACHE", "10")
    assert budget_from_env() == (64 << 20, 10)
    monkeypatch.setenv("FEDREP_CLIENT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FEDREP_CLIENT_CACHE_MB='lots'"):
        budget_from_env()


def test_a_thousand_tiny_clients_load_once_each():
    """The case a count-limited cache got wrong: 1,000 one-batch clients, served round after
    round, are each loaded once."""
    cfg = parse_run_config({"num-clients": 1000, "max-train-per-client": 10, "max-test-per-client": 10})
    federated._client_data.cache_clear()
    for _ in range(2):
        for client in range(1000):
            federated.load_client_data(cfg, client)
    info = federated._client_data.cache_info()
    assert info.misses == 1000 and info.hits == 1000 and info.entries == 1000
