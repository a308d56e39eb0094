"""A group's nodes, encoded for matching under a profile:
- `features`: the exact representation the compatibility kernel reads (kernels/compat.py);
- `vectors`: float32 vectors whose inner product approximates compatibility, for candidate
  search (one-hot categorical keys, kernel eigen-features of numeric keys, unit item vectors of
  multi-value keys, the unit embedding), each block scaled by the square root of its weight.
  The closer the approximation, the fewer candidates reach recall 0.99: with these blocks the
  benchmark needs 81 candidates per node where hashed one-hots and random Fourier features
  needed 121 (benchmarks/match.py, 1M nodes, exact search over the vectors).
The profile has been checked against the data before (engine.check_profile_fits)."""

from __future__ import annotations

import numpy as np

from mtool.kernels.compat import Features

# Keys with at most this many values (items) get exact one-hot columns: 32 hashed columns for a
# key of 150-600 values (the wide member of population.FAMILY, 30,000 nodes) held recall@20 to
# 0.81 at the widest search, one-hot columns gave 0.998 at the second width. The cost is memory:
# n x columns x 4 bytes, twice (the vectors and the list join's copy).
ONE_HOT_MAX = 1024
HASH_DIMS = 256  # columns of a hashed key beyond that
NUMERIC_DIMS = 8  # kernel eigen-features per numeric key, at least
NUMERIC_DIMS_MAX = 32  # and at most
NUMERIC_TRACE = 0.9  # the share of the kernel's trace they hold (between those bounds)
GRID = 512  # distinct values of a numeric key beyond which its kernel is taken on a grid
SEED = 20_240_607  # fixed: encodings (and so candidates) are reproducible


def _codes(values) -> np.ndarray:
    """int32 code of each value (first-seen order), -1 for missing; Arrow's dictionary encoder."""
    import pyarrow as pa

    encoded = pa.array(values, pa.string()).dictionary_encode()
    return encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)


def _numbers(values) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim_whitespace(pa.array(values, pa.string()))
    return pc.cast(trimmed, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float32)


def _item_bits(values, separator: str) -> tuple[np.ndarray, np.ndarray]:
    """Each node's item set as a bitset (N, words) uint64 (bit i: item code i), and has-key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(values, pa.string())
    has = np.asarray(arr.is_valid())
    lists = pc.split_pattern(arr, separator)
    rows = np.asarray(pc.list_parent_indices(lists))
    items = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = np.asarray(pc.not_equal(items, ""))
    rows, items = rows[keep], items.filter(pa.array(keep))
    codes = items.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    words = max(1, -(-(int(codes.max()) + 1 if len(codes) else 0) // 64))
    bits = np.zeros((len(arr), words), np.uint64)
    np.bitwise_or.at(bits, (rows, codes // 64), np.left_shift(np.uint64(1), (codes % 64).astype(np.uint64)))
    return bits, has


def encode(profile, nodes) -> Features:
    """Vectorised (Arrow compute), no per-node Python: 1M nodes in about a second per key."""
    f = Features(missing_zero=profile.missing == "zero")
    for spec in profile.keys:
        values = nodes.metadata[spec.name]
        if spec.type == "categorical":
            f.categorical.append((_codes(values), spec.weight, spec.required))
        elif spec.type == "numeric":
            f.numeric.append((_numbers(values), np.float32(spec.scale), spec.weight, spec.required))
        else:
            bits, has = _item_bits(values, spec.separator)
            f.multi.append((bits, has, spec.weight, spec.required))
    if profile.embedding_weight is not None and nodes.embedding is not None:
        emb = nodes.embedding
        has = ~np.isnan(emb).any(axis=1)
        unit = np.where(has[:, None], emb, 0)
        norms = np.linalg.norm(unit, axis=1, keepdims=True)
        unit = (unit / np.where(norms > 0, norms, 1)).astype(np.float32)
        f.embedding = (unit, has & (norms[:, 0] > 0), profile.embedding_weight)
    return f


def _categorical_block(codes, values: int, out) -> None:
    """One-hot of the value (exact: inner product = equality) when the key has at most
    ONE_HOT_MAX values, else signed hashing into HASH_DIMS columns."""
    ok = np.flatnonzero(codes >= 0)
    if values <= ONE_HOT_MAX:
        out[ok, codes[ok]] = 1
        return
    rng = np.random.default_rng(SEED)
    bucket, sign = rng.integers(0, HASH_DIMS, values), rng.choice(np.float32([-1, 1]), values)
    out[ok, bucket[codes[ok]]] = sign[codes[ok]]


def _numeric_factors(values, scale: float):
    """(grid, phi): features phi (one row per grid point) whose inner products approximate the
    triangle kernel max(0, 1 - |a-b|/scale) over the key's distinct values (a GRID of points
    when it has more): the top eigenvectors of the kernel matrix, as many as hold
    NUMERIC_TRACE of its trace (NUMERIC_DIMS at least, NUMERIC_DIMS_MAX at most). The kernel's
    spectrum decays slowly, so a narrow scale over a wide range needs more: eight fixed dims held
    47% of the trace at scale 4 over ages 18-80, and a node whose only key shared with a query
    is its age scored 0.58 for the same age (missing-values member of population.FAMILY; with
    90% of the trace, 0.9985 recall@20 at 100k). Rows scaled to unit length (equal values
    scoring exactly 1) cost the benchmark population's recall at the narrowest width (0.9924 ->
    worse than 0.99 on its check at 200k nodes: the neighbouring values' similarity inflated)."""
    present = values[~np.isnan(values)].astype(np.float64)
    if len(present) == 0:
        return None, np.zeros((0, NUMERIC_DIMS))
    distinct = np.unique(present)
    grid = distinct if len(distinct) <= GRID else np.linspace(distinct[0], distinct[-1], GRID)
    kernel = np.maximum(0, 1 - np.abs(grid[:, None] - grid[None, :]) / scale)
    eigenvalues, eigenvectors = np.linalg.eigh(kernel)
    by_size = np.argsort(-eigenvalues)
    held = np.cumsum(np.maximum(eigenvalues[by_size], 0)) / max(float(np.trace(kernel)), 1e-30)
    dims = int(np.clip(np.searchsorted(held, NUMERIC_TRACE) + 1, NUMERIC_DIMS, NUMERIC_DIMS_MAX))
    top = by_size[:dims]
    return grid, eigenvectors[:, top] * np.sqrt(np.maximum(eigenvalues[top], 0))


def _numeric_block(values, factors, out) -> None:
    """Each node's row of _numeric_factors (linearly interpolated between grid points)."""
    grid, phi = factors
    ok = ~np.isnan(values)
    present = values[ok].astype(np.float64)
    if grid is None or len(present) == 0:
        return
    if len(grid) < GRID or len(np.unique(present)) <= GRID:
        rows = phi[np.searchsorted(grid, present)]
    else:
        pos = np.clip((present - grid[0]) / (grid[1] - grid[0]), 0, len(grid) - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, len(grid) - 1)
        frac = (pos - lo)[:, None]
        rows = phi[lo] * (1 - frac) + phi[hi] * frac
    out[np.flatnonzero(ok), : phi.shape[1]] = rows


def _multi_block(bits, used, out) -> None:
    """The item set as a unit vector (one column per item, or signed hashing beyond
    ONE_HOT_MAX items): inner product = |a & b| / sqrt(|a| |b|), a cosine stand-in for Jaccard."""
    if len(used) <= ONE_HOT_MAX:  # one column per item: the bits themselves, unpacked in one pass
        out[:, :len(used)] = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, used]
    else:
        rng = np.random.default_rng(SEED)
        column, sign = rng.integers(0, HASH_DIMS, len(used)), rng.choice(np.float32([-1, 1]), len(used))
        for j, item in enumerate(used):
            flag = ((bits[:, item // 64] >> np.uint64(item % 64)) & np.uint64(1)).astype(bool)
            out[flag, column[j]] += sign[j]
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
    np.divide(out, norms, out=out, where=norms > 0)


def _domain(kind: str, features_entry):
    """What a key's block spans, counted once for its width and its columns: the number of
    values (categorical), the item codes in use (multi-value), the kernel's factors (numeric)."""
    if kind == "categorical":
        codes = features_entry[0]
        return int(codes.max()) + 1 if len(codes) else 0
    if kind == "numeric":
        values, scale, _, _ = features_entry
        return _numeric_factors(values, float(scale))
    if kind == "multi":
        bits = features_entry[0]
        return np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(bits, axis=0).view(np.uint8), bitorder="little"))
    return None


def _block_width(kind: str, domain) -> int:
    if kind == "numeric":
        return domain[1].shape[1]
    size = domain if kind == "categorical" else len(domain)
    return max(1, size) if size <= ONE_HOT_MAX else HASH_DIMS


def layout(features: Features):
    """The metadata blocks (kind, entry), their domains and widths, and the embedding's width."""
    blocks = [("categorical", e) for e in features.categorical] + [("numeric", e) for e in features.numeric] + \
             [("multi", e) for e in features.multi]
    domains = [_domain(kind, e) for kind, e in blocks]
    widths = [_block_width(kind, domain) for (kind, _), domain in zip(blocks, domains)]
    return blocks, domains, widths, 0 if features.embedding is None else features.embedding[0].shape[1]


def key_spans(features: Features, blocks=None) -> list:
    """Each key's (start, stop) columns in `vectors`, in Presence's key order (categorical,
    numeric, multi-value keys, then the embedding). `blocks`: layout(features), when the caller
    has it (it computes the numeric keys' kernel factors)."""
    _, _, widths, emb_dims = blocks or layout(features)
    ends = np.cumsum([0] + widths + ([emb_dims] if emb_dims else []))
    return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def vectors(profile, features: Features, n: int, blocks=None) -> np.ndarray:
    """(n, d) float32 search vectors; inner products approximate the weighted key scores. A
    key a node lacks leaves its block zero (PatternJoin relies on it). `blocks`: as key_spans."""
    blocks, domains, widths, emb_dims = blocks or layout(features)
    out = np.zeros((n, sum(widths) + emb_dims), np.float32)
    at = 0
    for (kind, entry), domain, width in zip(blocks, domains, widths):
        view = out[:, at:at + width]
        if kind == "categorical":
            codes, weight, _ = entry
            _categorical_block(codes, domain, view)
        elif kind == "numeric":
            values, scale, weight, _ = entry
            _numeric_block(values, domain, view)
        else:
            bits, _, weight, _ = entry
            _multi_block(bits, domain, view)
        view *= np.float32(np.sqrt(weight))
        at += width
    if emb_dims:
        unit, _, weight = features.embedding  # (1 + cos) / 2: the cosine carries weight / 2
        np.multiply(unit, np.float32(np.sqrt(weight / 2)), out=out[:, at:])
    return out


class Presence:
    """Which keys each node has, for the search where nodes lack some (the formula divides by
    the weights of the keys *both* nodes have, so a node lacking keys can score 1.0 on the few
    it has, where a plain inner product ranked it last).

    `has` (n, K) is 0/1 per key (categorical, numeric, multi, then the embedding), `weight` (K,)
    the keys' weights and `constant` (K,) the part of a key's score no inner product holds (the
    embedding's (1 + cos) / 2 carries weight / 2). For a query q and a pool node c:
    score = (q . c + constant(q and c)) / weight(q and c), both terms a (K)-long product."""

    def __init__(self, features: Features, n: int):
        columns, weight, constant = [], [], []
        for codes, w, _ in features.categorical:
            columns.append(codes >= 0), weight.append(w), constant.append(0.0)
        for values, _, w, _ in features.numeric:
            columns.append(~np.isnan(values)), weight.append(w), constant.append(0.0)
        for _, has, w, _ in features.multi:
            columns.append(has), weight.append(w), constant.append(0.0)
        if features.embedding is not None:
            _, has, w = features.embedding
            columns.append(has), weight.append(w), constant.append(w / 2)
        self.has = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((n, 0), np.float32)
        self.weight = np.float32(weight)
        self.constant = np.float32(constant)

    @property
    def complete(self) -> bool:
        return bool(self.has.all())

    def total(self) -> np.ndarray:
        """Each node's weight against a node that has every key."""
        return self.has @ self.weight

    def query_terms(self, nodes) -> tuple[np.ndarray, np.ndarray]:
        """(constant, weight) rows of these query nodes: a product with a pool's `has` gives
        each pair's constant and denominator."""
        has = self.has[nodes]
        return has * self.constant, has * self.weight

    def pool_vectors(self, vecs: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """The pool's vectors for the list join where nodes lack keys: divided by the node's own
        total (a complete query then ranks by the formula, up to the vectors' approximation) and
        with the constant share as one more column (against a 1 in the queries': query_vectors),
        so that k-means and the probes see the nodes as the formula does."""
        total = self.total()[pool]
        total = np.where(total > 0, total, 1).astype(np.float32)
        out = np.empty((len(pool), vecs.shape[1] + 1), np.float32)
        np.divide(vecs[pool], total[:, None], out=out[:, :-1])
        out[:, -1] = (self.has[pool] @ self.constant) / total
        return out

    @staticmethod
    def query_vectors(vecs: np.ndarray) -> np.ndarray:
        out = np.empty((len(vecs), vecs.shape[1] + 1), np.float32)
        out[:, :-1] = vecs
        out[:, -1] = 1
        return out
