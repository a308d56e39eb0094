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
