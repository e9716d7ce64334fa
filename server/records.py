"""Flower ArrayRecord <-> named NumPy arrays, in one place."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for key, value in arrays.items():
        record[key] = Array.from_numpy_ndarray(np.ascontiguousarray(value))
    return record


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
