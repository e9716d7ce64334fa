"""fedrep.records writes the bytes Flower's Array.from_numpy_ndarray writes and reads them back
as Flower's Array.numpy does, without np.save / np.load per array."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedrep.records import array_from_numpy, array_to_numpy, from_record, from_record_torch, to_record

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", ">f4", "complex64"]
SHAPES = [(), (0,), (3,), (2, 3), (5, 1, 2), (4, 0, 2), (1,) * 40]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_same_bytes_and_values_as_flower(dtype: str, shape: tuple[int, ...]):
    value = np.asarray(np.random.default_rng(0).standard_normal(shape) * 10).astype(dtype)
    flower, ours = Array.from_numpy_ndarray(value), array_from_numpy(value)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (flower.data, flower.dtype, flower.shape,
                                                               flower.stype)
    back = array_to_numpy(flower)
    assert back.dtype == value.dtype and back.shape == value.shape
    np.testing.assert_array_equal(back, value)
    assert back.flags.writeable and back.flags.c_contiguous


def test_a_header_of_another_kind_is_read_by_numpy():
    """A Fortran-ordered .npy (another writer's) goes through np.load, values intact."""
    value = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    buffer = io.BytesIO()
    np.save(buffer, value)
    stored = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=buffer.getvalue())
    np.testing.assert_array_equal(array_to_numpy(stored), value)
    # non-contiguous input is written C-ordered, as np.save writes it
    assert array_from_numpy(value).data == Array.from_numpy_ndarray(np.ascontiguousarray(value)).data


def test_record_round_trip_in_order_with_tensors():
    state = {"body.0.weight": torch.randn(6, 1, 5, 5), "body.0.bias": torch.zeros(6),
             "bn.num_batches_tracked": torch.tensor(7), "head.weight": torch.randn(10, 84)}
    record = to_record(state)
    assert list(record) == list(state)
    flower = ArrayRecord(state)  # Flower's own conversion of the same state dict
    assert all(record[k].data == flower[k].data for k in state)
    back = from_record_torch(record)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key
    assert from_record(record)["bn.num_batches_tracked"].shape == ()


def test_a_read_only_view_shares_the_bytes_and_refuses_writes():
    record = to_record({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    view = from_record(record, writable=False)["w"]
    np.testing.assert_array_equal(view, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1.0
