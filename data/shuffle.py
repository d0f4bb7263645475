"""Which window comes i-th: a keyed permutation computed per index, with no table.

`permute(i, n, key)` is a bijection of [0, n) chosen by `key`: a Feistel network
over the smallest power of two that covers n (each round rewrites one half of
the bits with a keyed hash of the other), whose values >= n are walked through
the network again until they land in range (cycle walking; the construction
behind grain's and TensorFlow's `index_shuffle`). Each index is computed on its
own in O(1), so an epoch boundary builds no permutation table, restoring a
position anywhere in an epoch costs nothing, and the memory used does not grow
with the corpus.
"""

import functools

import numpy as np

ROUNDS = 6  # with 4, where an index lands was measurably non-uniform over keys for n < 10
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S1, _S2, _S3 = np.uint64(30), np.uint64(27), np.uint64(31)


@functools.lru_cache(maxsize=8)
def _round_keys(key: int) -> list:
    return [hash_ints(key, r) for r in range(ROUNDS)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective hash of uint64 values with full avalanche.
    uint64 arithmetic wraps by design; callers silence numpy's overflow warnings."""
    x = (x ^ (x >> _S1)) * _M1
    x = (x ^ (x >> _S2)) * _M2
    return x ^ (x >> _S3)


def hash_ints(*values) -> np.ndarray:
    """A uint64 hash of a sequence of integers (or integer arrays, broadcast together)."""
    h = np.atleast_1d(_GOLDEN)
    with np.errstate(over="ignore"):
        for value in values:
            h = _mix(h ^ (np.asarray(value, np.uint64) + _GOLDEN))
    return h if h.size > 1 or np.ndim(values[-1]) else h[0]


def permute(index, n: int, key: int) -> np.ndarray:
    """Element `index` (an int array) of the permutation of [0, n) chosen by `key`:
    int64 values in [0, n)."""
    bits = max(2, (n - 1).bit_length())  # the network permutes [0, 2**bits), < 2n values
    low = np.uint64(bits // 2)
    low_mask, high_mask = (
        np.uint64((1 << (bits // 2)) - 1),
        np.uint64((1 << (bits - bits // 2)) - 1),
    )
    round_keys = _round_keys(int(key))
    x = np.array(index, np.uint64, ndmin=1)
    walking = np.ones(x.shape, bool)
    with np.errstate(over="ignore"):
        while walking.any():
            high, low_half = x[walking] >> low, x[walking] & low_mask
            for r, round_key in enumerate(round_keys):  # each round rewrites one half
                if r % 2:
                    low_half ^= _mix(high ^ round_key) & low_mask
                else:
                    high ^= _mix(low_half ^ round_key) & high_mask
            x[walking] = (high << low) | low_half
            walking &= x >= np.uint64(n)
    return x.astype(np.int64)
