"""SecAgg+'s masked vector at 4 bytes a value: what the site's mod packs and the coordinator's grid restores.

Flower's ``secaggplus_mod`` uploads the masked, quantised update as int64 arrays, although every value has already
been reduced modulo ``modulus_range`` (2^32 at most, SecAggPlusWorkflow refuses more). fedmusk's client mod
repacks them as uint32 (``pack_masked_vector``) and the coordinator turns them back into the very int64 arrays
(``restore_masked_vector``) before SecAggPlusWorkflow sums and unmasks them, so the aggregate is bit-identical and
Flower is used unmodified. The restore is keyed on the dtype: an int64 vector (a site that does not pack) passes
through unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

WIRE_DTYPE = np.uint32
FLOWER_DTYPE = np.int64


def _masked(content: RecordDict) -> list[bytes] | None:
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return None
    return list(configs[Key.MASKED_PARAMETERS])


def pack_masked_vector(content: RecordDict) -> bool:
    """Rewrite the masked vector of a SecAgg+ reply's content as uint32 arrays, in place. Returns whether the
    content held one. Raises ValueError when a value lies outside [0, 2^32) (a modulus above 2^32: nothing is
    packed then, nothing may be lost)."""
    blobs = _masked(content)
    if blobs is None:
        return False
    arrays = [bytes_to_ndarray(b) for b in blobs]
    for array in arrays:
        if array.dtype == WIRE_DTYPE:
            continue
        if array.size and (int(array.min()) < 0 or int(array.max()) > np.iinfo(WIRE_DTYPE).max):
            raise ValueError("SecAgg+ masked values exceed 32 bits: cannot pack them (is modulus_range > 2^32?)")
    content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [
        ndarray_to_bytes(a.astype(WIRE_DTYPE, copy=False)) for a in arrays
    ]
    return True


def restore_masked_vector(content: RecordDict) -> bool:
    """Turn a packed masked vector back into Flower's int64 arrays, in place (unpacked ones pass unchanged).
    Returns whether the content held a masked vector."""
    blobs = _masked(content)
    if blobs is None:
        return False
    arrays = [bytes_to_ndarray(b) for b in blobs]
    if any(a.dtype == WIRE_DTYPE for a in arrays):
        content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [
            ndarray_to_bytes(a.astype(FLOWER_DTYPE)) if a.dtype == WIRE_DTYPE else b for a, b in zip(arrays, blobs)
        ]
    return True
