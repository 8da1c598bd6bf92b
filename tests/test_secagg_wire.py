"""SecAgg+'s masked vector on the wire: packed as uint32 at the site, restored to Flower's int64 exactly."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedmusk.secagg_wire import pack_masked_vector, restore_masked_vector


def reply(arrays) -> RecordDict:
    """A SecAgg+ reply's content as secaggplus_mod builds it: the masked vector as .npy bytes of int64 arrays."""
    masked_vector = [ndarray_to_bytes(a) for a in arrays]
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked_vector})})


def masked(content: RecordDict) -> list[bytes]:
    return list(content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])


def test_packed_masked_vector_is_half_the_bytes_and_restores_to_the_very_int64_arrays():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 2**32, size=shape, dtype=np.int64) for shape in [(8, 1024), (1024, 8), (1,), (3, 5)]]
    arrays[0][0, :2] = [0, 2**32 - 1]  # both ends of the modulus range
    sent = reply(arrays)
    flower = masked(sent)
    assert pack_masked_vector(sent)
    packed = masked(sent)
    assert all(bytes_to_ndarray(b).dtype == np.uint32 for b in packed)
    values = sum(a.size for a in arrays)
    assert sum(map(len, packed)) - 4 * values == sum(map(len, flower)) - 8 * values  # the same .npy headers
    assert restore_masked_vector(sent)
    assert masked(sent) == flower  # byte for byte what Flower's workflow would have received


def test_unpacked_vectors_pass_through_and_values_beyond_32_bits_are_refused():
    arrays = [np.arange(6, dtype=np.int64).reshape(2, 3)]
    content = reply(arrays)
    before = masked(content)
    assert restore_masked_vector(content) and masked(content) == before  # a site that does not pack
    assert not pack_masked_vector(RecordDict({"other": ConfigRecord({"x": 1})}))
    with pytest.raises(ValueError, match="exceed 32 bits"):
        pack_masked_vector(reply([np.array([2**32], dtype=np.int64)]))
    with pytest.raises(ValueError, match="exceed 32 bits"):
        pack_masked_vector(reply([np.array([-1], dtype=np.int64)]))
