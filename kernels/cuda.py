"""CuPy wrapper of the fused CUDA kernel (kernels/compat.cu); GPU only.

Used by `pair_scores_gpu` for profiles without multi-value keys; compat.pair_scores is the
reference it is checked against (tests/unit/test_kernels.py, when a GPU is present)."""

from __future__ import annotations

import functools
from importlib import resources

THREADS = 256


@functools.lru_cache(maxsize=1)
def _kernel():
    import cupy

    source = resources.files("mtool.kernels").joinpath("compat.cu").read_text()
    return cupy.RawModule(code=source, options=("--std=c++14",)).get_function("pair_scores_fused")


def pair_scores_gpu(features, q, c):
    import cupy as cp

    from mtool.kernels import compat

    if features.multi:
        raise ValueError("the fused kernel has no multi-value keys: use compat.pair_scores")
    n = None
    cats = [codes for codes, _, _ in features.categorical]
    nums = [values for values, _, _, _ in features.numeric]
    for arr in cats + nums + ([features.embedding[0]] if features.embedding else []):
        n = len(arr)
    B, C = c.shape
    out = cp.empty((B, C), cp.float32)
    stack_i = cp.stack(cats).astype(cp.int32) if cats else cp.zeros((1, 1), cp.int32)
    stack_f = cp.stack(nums).astype(cp.float32) if nums else cp.zeros((1, 1), cp.float32)
    emb, has, weight = features.embedding if features.embedding else (cp.zeros((1, 1), cp.float32),
                                                                     cp.zeros(1, bool), 0.0)
    args = (cp.ascontiguousarray(q, dtype=cp.int64), cp.ascontiguousarray(c, dtype=cp.int64), cp.int32(B), cp.int32(C),
            cp.int32(n), stack_i, cp.asarray([w for _, w, _ in features.categorical] or [0], cp.float32),
            cp.asarray([r for _, _, r in features.categorical] or [0], cp.uint8), cp.int32(len(cats)),
            stack_f, cp.asarray([s for _, s, _, _ in features.numeric] or [1], cp.float32),
            cp.asarray([w for _, _, w, _ in features.numeric] or [0], cp.float32),
            cp.asarray([r for *_, r in features.numeric] or [0], cp.uint8), cp.int32(len(nums)),
            cp.ascontiguousarray(emb, dtype=cp.float32), cp.asarray(has, cp.uint8), cp.float32(weight),
            cp.int32(emb.shape[1] if features.embedding else 0),
            cp.float32(compat.total_weight(features) if features.missing_zero else 0.0), out)
    blocks = (B * C + THREADS - 1) // THREADS
    _kernel()((blocks,), (THREADS,), args)
    return out
