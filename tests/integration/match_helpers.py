"""Synthetic nodes and an independent brute-force reference of the profile's formula."""

from __future__ import annotations

import json
import random

import psycopg

PROFILE = {
    "k": 5,
    "keys": {
        "city": {"type": "categorical", "weight": 1.0},
        "age": {"type": "numeric", "scale": 10, "weight": 2.0},
        "interests": {"type": "multi", "separator": ",", "weight": 3.0},
        "smoker": {"type": "categorical", "weight": 1.0, "required": True},
    },
    "embedding": {"weight": 4.0},
}
CITIES = ["paris", "lyon", "nice", "lille"]
INTERESTS = ["tennis", "jazz", "hiking", "chess", "cinema", "cooking"]


def make_nodes(n, group, domain, seed=1, dim=4, with_gender=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        meta = {}
        if rng.random() < 0.9:
            meta["city"] = rng.choice(CITIES)
        if rng.random() < 0.9:
            meta["age"] = str(rng.randint(18, 60))
        if rng.random() < 0.8:
            meta["interests"] = ", ".join(rng.sample(INTERESTS, rng.randint(0, 3)))
        meta["smoker"] = rng.choice(["yes", "no", "no"])
        if with_gender:
            meta["gender"] = rng.choice(["M", "F"])
        emb = [rng.gauss(0, 1) for _ in range(dim)] if rng.random() < 0.9 else None
        rows.append({"reference_id": f"n{i:05d}", "group_id": group, "domain_id": domain,
                     "metadata": json.dumps(meta), "embedding": emb})
    return rows


def score(profile, a, b):
    """The profile's formula (README), written out pair by pair. `missing: zero`: a key either
    node lacks scores 0 and keeps its weight in the denominator."""
    num = den = shared = 0.0
    zero = profile.get("missing", "skip") == "zero"
    for key, spec in profile["keys"].items():
        if key not in a["meta"] or key not in b["meta"]:
            if spec.get("required"):
                return None
            if zero:
                den += spec.get("weight", 1.0)
            continue
        shared += 1
        x, y = a["meta"][key], b["meta"][key]
        if spec["type"] == "categorical":
            s = 1.0 if x == y else 0.0
        elif spec["type"] == "numeric":
            s = max(0.0, 1 - abs(float(x) - float(y)) / spec["scale"])
        else:
            sx = {t.strip() for t in x.split(spec.get("separator", ",")) if t.strip()}
            sy = {t.strip() for t in y.split(spec.get("separator", ",")) if t.strip()}
            s = len(sx & sy) / len(sx | sy) if sx | sy else 0.0
        if spec.get("required") and s <= 0:
            return None
        num += spec["weight"] * s
        den += spec["weight"]
    if "embedding" in profile and a["emb"] is not None and b["emb"] is not None:
        dot = sum(p * q for p, q in zip(a["emb"], b["emb"]))
        na = sum(p * p for p in a["emb"]) ** 0.5
        nb = sum(q * q for q in b["emb"]) ** 0.5
        num += profile["embedding"]["weight"] * (1 + dot / (na * nb)) / 2
        den += profile["embedding"]["weight"]
        shared += 1
    elif "embedding" in profile and zero:
        den += profile["embedding"]["weight"]
    return num / den if shared else None  # nothing in common: not compared, no edge


def brute_force(profile, rows, partition=None):
    """{reference_id: [(matched, score), ...]} best k, ties by matched id."""
    nodes = [{"id": r["reference_id"], "meta": json.loads(r["metadata"]), "emb": r["embedding"]} for r in rows]
    out = {}
    for a in nodes:
        cands = []
        for b in nodes:
            if a is b:
                continue
            if partition:
                key, left, right = partition
                sa, sb = a["meta"].get(key), b["meta"].get(key)
                if not ((sa == left and sb == right) or (sa == right and sb == left)):
                    continue
            s = score(profile, a, b)
            if s is not None:
                cands.append((-round(s, 6), b["id"]))  # the contract's precision: 6 decimals
        if partition and a["meta"].get(partition[0]) not in (partition[1], partition[2]):
            continue
        out[a["id"]] = [(m, -s) for s, m in sorted(cands)[: profile["k"]]]
    return out


def stored_matches(dsn, group):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT reference_id, matched_reference_id, compatibility_score, processing_cycle_id "
                            "FROM potential_matches WHERE group_id = %s", (group,)).fetchall()
    out = {}
    for ref, m, s, _ in rows:
        out.setdefault(ref, []).append((m, s))
    return {r: sorted(v, key=lambda t: (-t[1], t[0])) for r, v in out.items()}, {c for *_, c in rows}
