"""Clustered synthetic node populations for tests, the demo and benchmarks: metadata (city,
age, interests, smoker) and an embedding drawn around cluster centres, so that compatible
nodes form neighbourhoods as real users do."""

from __future__ import annotations

import numpy as np

CITIES = np.array(["paris", "lyon", "nice", "lille", "nantes", "rennes", "lisbon", "porto", "madrid", "rome"])
INTERESTS = np.array(["tennis", "jazz", "hiking", "chess", "cinema", "cooking", "running", "opera", "yoga",
                      "travel", "painting", "football"])
PROFILE = {
    "k": 20,
    "keys": {
        "city": {"type": "categorical", "weight": 1.0},
        "age": {"type": "numeric", "scale": 10, "weight": 2.0},
        "interests": {"type": "multi", "separator": ",", "weight": 2.0},
    },
    "embedding": {"weight": 4.0},
}


def population(n: int, dim: int = 64, clusters: int | None = None, seed: int = 0, gender: bool = False) -> dict:
    """Columns of n nodes (reference ids sortable, zero-padded)."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(4, int(np.sqrt(n) / 2))
    centre = rng.integers(0, clusters, n)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    emb = centres[centre] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    city = CITIES[(centre + (rng.random(n) < 0.2) * rng.integers(0, len(CITIES), n)) % len(CITIES)]
    age = np.clip((25 + (centre % 30) + rng.normal(0, 4, n)).round(), 18, 80).astype(int)
    picks = (centre[:, None] + rng.integers(0, 4, (n, 3))) % len(INTERESTS)
    interests = [",".join(sorted(set(INTERESTS[p]))) for p in picks]
    out = {"reference_id": [f"u{i:08d}" for i in range(n)], "city": city.tolist(), "age": age.astype(str).tolist(),
           "interests": interests, "embedding": emb}
    if gender:
        out["gender"] = np.where(rng.random(n) < 0.5, "M", "F").tolist()
    return out


FAMILY = ("today", "required", "missing", "wide", "highdim", "metadata", "ties", "bipartite", "strict")


def member(kind: str, n: int, seed: int, share: float | None = None) -> tuple[dict, dict]:
    """(columns, profile) of one member of a family of populations unlike each other, its
    parameters drawn from `seed` (weights, missing rates, split shares, dimensions): what the
    engine's recall must hold on, not only on `population`'s one shape. Kinds: FAMILY. `share`
    fixes the drawn share where the kind has one (the rare value, the missing values, the
    smaller side)."""
    rng = np.random.default_rng([seed, FAMILY.index(kind)])
    dim = {"highdim": 384, "metadata": 8}.get(kind, int(rng.choice([16, 32, 64])))
    cols = population(n, dim=dim, clusters=int(rng.integers(20, 200)), seed=seed)
    w = lambda lo, hi: round(float(rng.uniform(lo, hi)), 2)  # noqa: E731 - a weight drawn in a range
    keys = {"city": {"type": "categorical", "weight": w(0.5, 3)},
            "age": {"type": "numeric", "scale": int(rng.integers(3, 15)), "weight": w(0.5, 3)},
            "interests": {"type": "multi", "separator": ",", "weight": w(0.5, 3)}}
    profile = {"k": 20, "keys": keys, "embedding": {"weight": w(2, 6)}}
    if kind == "required":  # a required categorical key, one of its values rare (1-5% of the group)
        rare = share if share is not None else float(rng.uniform(0.01, 0.05))
        cols["plan"] = np.where(rng.random(n) < rare, "rare", np.where(rng.random(n) < 0.3, "a", "b")).tolist()
        keys["plan"] = {"type": "categorical", "weight": w(0.5, 2), "required": True}
    elif kind == "missing":  # 10-30% of each key and of the embedding missing
        for name in ("city", "age", "interests"):
            gone = rng.random(n) < (share if share is not None else rng.uniform(0.1, 0.3))
            cols[name] = [None if g else v for v, g in zip(cols[name], gone)]
        cols["embedding"][rng.random(n) < (share if share is not None else rng.uniform(0.1, 0.3))] = np.nan
    elif kind == "wide":  # keys with hundreds of values and items (hashed in the search vectors)
        values = int(rng.integers(150, 600))
        cols["city"] = [f"c{v}" for v in rng.integers(0, values, n).tolist()]
        items = rng.integers(0, values, (n, 4))
        cols["interests"] = [",".join(f"i{i}" for i in sorted(set(row))) for row in items.tolist()]
        profile["embedding"]["weight"] = w(0.5, 1.5)  # below the metadata
    elif kind == "highdim":
        profile["embedding"]["weight"] = w(6, 10)  # the embedding weighted highest
    elif kind == "metadata":
        del profile["embedding"]
        cols["embedding"] = None
    elif kind == "ties":  # few distinct values: many equal scores
        cols["city"] = [c[:1] for c in cols["city"]]
        cols["age"] = [str(int(a) // 20 * 20) for a in cols["age"]]
        del profile["embedding"]
        cols["embedding"] = None
    elif kind == "strict":  # a required numeric key and a required multi-value key
        keys["age"]["required"] = True  # a pair whose ages differ by the scale or more is excluded
        keys["interests"]["required"] = True  # a pair with no interest in common is excluded
    elif kind == "bipartite":  # a 30/70 split (or 5/95 .. 40/60)
        share = share if share is not None else float(rng.uniform(0.05, 0.4))
        cols["gender"] = np.where(rng.random(n) < share, "F", "M").tolist()
        profile["partition"] = {"key": "gender", "left": "F", "right": "M"}
    return cols, profile


def reference_top_k(profile, nodes, features, q: int) -> np.ndarray | None:
    """Node q's exact top K (node indices) by the compatibility kernel over every node it may
    match (its other side in bipartite mode; the kernel itself excludes required-key misses),
    None for a node on no side: the reference of the recall benchmarks and tests."""
    from mtool.kernels import compat

    n = len(nodes)
    pool = np.arange(n)
    if profile.bipartite:
        side = np.array(nodes.metadata[profile.partition.key], dtype=object)
        other = {profile.partition.left: profile.partition.right,
                 profile.partition.right: profile.partition.left}.get(side[q])
        if other is None:
            return None
        pool = pool[side == other]
    s = compat.pair_scores(features, np.array([q]), pool[None, :])
    s[0, pool == q] = -np.inf
    best = compat.top_k(s, pool[None, :], np.arange(n), profile.k)[0][0]
    return best[best >= 0]



def reference_hits(profile, nodes, features, q: int, delivered) -> tuple[int, int, int] | None:
    """How well `delivered` (node indices matched to q) fills q's exact top K: (slots filled by a
    match at least as good as the K-th best, slots, slots filled by the very node of the exact
    top K), None for a node on no side. The first is recall's numerator (calibrate.recall_hits
    says why equal scores count); the third shows how much of the gap is ties. The delivered
    nodes' scores are computed here by the kernel, not taken from the engine."""
    from mtool.kernels import compat

    best = reference_top_k(profile, nodes, features, q)
    if best is None:
        return None
    delivered = np.asarray(list(delivered), np.int64)
    if len(best) == 0:
        return 0, 0, 0
    kth = compat.pair_scores(features, np.array([q]), best[None, :])[0].min()
    got = compat.pair_scores(features, np.array([q]), delivered[None, :])[0] if len(delivered) else np.zeros(0)
    good = int(np.count_nonzero((got >= kth) & (delivered != q)))
    return min(good, len(best)), len(best), len(np.intersect1d(best, delivered))
