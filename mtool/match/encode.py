"""A group's nodes, encoded for matching under a profile:
- `features`: the exact representation the compatibility kernel reads (kernels/compat.py);
- `vectors`: float32 vectors whose inner product approximates compatibility, for FAISS
  candidate search (hashed one-hot for categorical keys, random Fourier features of a Gaussian
  of width `scale` for numeric keys, a hashed normalised bag for multi-value keys, the unit
  embedding), each block scaled by the square root of its weight.
The profile has been checked against the data before (engine.check_profile_fits)."""

from __future__ import annotations

import zlib

import numpy as np

from mtool.kernels.compat import Features

HASH_DIMS = 32  # buckets per categorical or multi-value key
RFF_DIMS = 16  # random Fourier features per numeric key
SEED = 20_240_607  # fixed: encodings (and so candidates) are reproducible


def _codes(values):
    table, out = {}, np.empty(len(values), np.int32)
    for i, v in enumerate(values):
        out[i] = -1 if v is None else table.setdefault(v, len(table))
    return out


def encode(profile, nodes) -> Features:
    f = Features()
    n = len(nodes)
    for spec in profile.keys:
        values = nodes.metadata[spec.name]
        if spec.type == "categorical":
            f.categorical.append((_codes(values), spec.weight, spec.required))
        elif spec.type == "numeric":
            arr = np.array([np.nan if v is None else float(v) for v in values], np.float32)
            f.numeric.append((arr, np.float32(spec.scale), spec.weight, spec.required))
        else:
            sets = [None if v is None else sorted({s.strip() for s in v.split(spec.separator) if s.strip()})
                    for v in values]
            vocab: dict = {}
            codes = [[vocab.setdefault(item, len(vocab)) for item in s or ()] for s in sets]
            words = max(1, -(-len(vocab) // 64))
            bits = np.zeros((n, words), np.uint64)
            for i, cs in enumerate(codes):
                for code in cs:
                    bits[i, code // 64] |= np.uint64(1) << np.uint64(code % 64)
            has = np.array([s is not None for s in sets])
            f.multi.append((bits, has, spec.weight, spec.required))
    if profile.embedding_weight is not None and nodes.embedding is not None:
        emb = nodes.embedding
        has = ~np.isnan(emb).any(axis=1)
        unit = np.where(has[:, None], emb, 0)
        norms = np.linalg.norm(unit, axis=1, keepdims=True)
        unit = (unit / np.where(norms > 0, norms, 1)).astype(np.float32)
        f.embedding = (unit, has & (norms[:, 0] > 0), profile.embedding_weight)
    return f


def _bucket(code: int, key: str) -> tuple[int, float]:
    h = zlib.crc32(f"{key}\x00{code}".encode())
    return h % HASH_DIMS, (1.0 if (h >> 16) & 1 else -1.0)


def vectors(profile, features: Features, n: int) -> np.ndarray:
    """(n, d) float32 search vectors; inner products approximate the weighted key scores."""
    rng = np.random.default_rng(SEED)
    blocks = []
    for (codes, weight, _), spec in zip(features.categorical, [s for s in profile.keys if s.type == "categorical"]):
        block = np.zeros((n, HASH_DIMS), np.float32)
        table = np.array([_bucket(c, spec.name) for c in range(int(codes.max()) + 1)] or [(0, 0.0)])
        ok = codes >= 0
        block[np.flatnonzero(ok), table[codes[ok], 0].astype(int)] = table[codes[ok], 1]
        blocks.append(block * np.sqrt(weight))
    for values, scale, weight, _ in features.numeric:
        omega = rng.normal(size=RFF_DIMS).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, RFF_DIMS).astype(np.float32)
        block = np.sqrt(2.0 / RFF_DIMS) * np.cos(np.nan_to_num(values)[:, None] / scale * omega + phase)
        block[np.isnan(values)] = 0
        blocks.append(block.astype(np.float32) * np.sqrt(weight))
    for bits, has, weight, _ in features.multi:
        block = np.zeros((n, HASH_DIMS), np.float32)
        flags = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")  # (n, words * 64): item codes
        rows, codes = np.nonzero(flags)
        np.add.at(block, (rows, (codes.astype(np.int64) * 2_654_435_761 % 2**32) % HASH_DIMS), 1.0)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        blocks.append(block / np.where(norms > 0, norms, 1) * np.sqrt(weight))
    if features.embedding is not None:
        unit, has, weight = features.embedding
        blocks.append(unit * np.sqrt(weight / 2))
    return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)
