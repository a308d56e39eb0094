"""The approximate path (FAISS candidates + exact rescoring) on a clustered population larger
than the exact threshold: recall@K against the exact top-K by true compatibility."""

from __future__ import annotations

import numpy as np

from mtool.device import Device
from mtool.kernels import compat
from mtool.match import encode as enc
from mtool.match import engine, staging
from mtool.match import population as popm
from mtool.match import profile as prof
from mtool.match.nodes import GroupNodes
from mtool.match.costs import SMALLEST


def exact_top_k(features, q: int, n: int, k: int):
    """Node q's exact top K (nodes, scores) over the whole group by the kernel, itself excluded."""
    everyone = np.arange(n)[None, :]
    s = compat.pair_scores(features, np.array([q]), everyone)
    s[0, q] = -np.inf
    nodes, scores = compat.top_k(s, everyone, np.arange(n), k)
    return nodes[0], scores[0]


def test_approximate_mode_reaches_recall_099(tmp_path):
    n = 12_000
    assert n > SMALLEST  # the list join, not the exact path (costs.py)
    p = popm.population(n, seed=3)
    nodes = GroupNodes("g", "d", p["reference_id"], {c: p[c] for c in ("city", "age", "interests")}, p["embedding"])
    profile = prof.parse(popm.PROFILE)
    features = enc.encode(profile, nodes)
    opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path))
    neighbors, _ = staging.stage_matches(opts, profile, nodes, features, str(tmp_path / "g"))
    queries = np.random.default_rng(0).choice(n, 150, replace=False)
    hits = 0
    for q in queries:
        exact, _ = exact_top_k(features, q, n, profile.k)
        hits += len(set(exact) & set(neighbors[q]))
        assert q not in neighbors[q]
    assert hits / (len(queries) * profile.k) >= 0.99


def test_block_size_and_search_batches_do_not_change_the_result(tmp_path):
    """Blocks are the resume unit and are searched in batches of consecutive blocks; neither
    the block size, the batching (threads) nor a resume may change which matches a node gets."""
    p = popm.population(9_000, seed=5)
    nodes = GroupNodes("g", "d", p["reference_id"], {c: p[c] for c in ("city", "age", "interests")}, p["embedding"])
    profile = prof.parse(popm.PROFILE)
    features = enc.encode(profile, nodes)
    results = []
    for block_rows, threads in ((16384, 1), (700, 2), (1000, 1)):
        opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path), block_rows=block_rows,
                                   threads=threads)
        results.append(staging.stage_matches(opts, profile, nodes, features, str(tmp_path / f"g{block_rows}")))
    # Resumed: the blocks an earlier run finished are read from its staging arrays, the others
    # computed again; the result is the same.
    folder = tmp_path / "g700"
    for marker in sorted((folder / "done").iterdir(), key=lambda m: int(m.name))[::2]:
        marker.unlink()
    opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path), block_rows=700, threads=2)
    results.append(staging.stage_matches(opts, profile, nodes, features, str(folder)))
    for neighbors, scores in results[1:]:
        assert np.array_equal(neighbors, results[0][0])
        assert np.array_equal(scores, results[0][1])


def test_approximate_bipartite_mode_reaches_recall_099_across_sides_only(tmp_path):
    n = 14_000  # each side (~7,000) above the exact threshold: the list join, with the other side's probes
    assert n // 2 > SMALLEST
    p = popm.population(n, seed=4, gender=True)
    keys = ("city", "age", "interests", "gender")
    nodes = GroupNodes("g", "d", p["reference_id"], {c: p[c] for c in keys}, p["embedding"])
    profile = prof.parse({**popm.PROFILE, "partition": {"key": "gender", "left": "M", "right": "F"}})
    features = enc.encode(profile, nodes)
    opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path))
    neighbors, _ = staging.stage_matches(opts, profile, nodes, features, str(tmp_path / "g"))
    side = np.array(p["gender"])
    hits = 0
    queries = np.random.default_rng(1).choice(n, 150, replace=False)
    for q in queries:
        pool = np.flatnonzero(side != side[q])[None, :]
        exact = compat.top_k(compat.pair_scores(features, np.array([q]), pool), pool, np.arange(n), profile.k)[0][0]
        hits += len(set(exact) & set(neighbors[q]))
        assert all(side[m] != side[q] for m in neighbors[q] if m >= 0)
    assert hits / (len(queries) * profile.k) >= 0.99


def test_ties_resume_and_thread_count_give_the_same_matches(tmp_path):
    """A population with heavy ties (4 cities, 6 interests, a 4-dim embedding): many candidates
    tie in the search's inner products, so a search batch cut another way (by thread count, or
    by which blocks a killed run had finished) used to keep another of the tied candidates.
    Batches are now fixed by the group and the block size: the same matches every way."""
    import json

    from tests.integration.match_helpers import PROFILE, make_nodes

    rows = make_nodes(6_000, "g", "d", seed=9)
    metas = [json.loads(r["metadata"]) for r in rows]
    dim = 4
    emb = np.array([r["embedding"] if r["embedding"] else [np.nan] * dim for r in rows], np.float32)
    nodes = GroupNodes("g", "d", [r["reference_id"] for r in rows],
                       {k: [m.get(k) for m in metas] for k in PROFILE["keys"]}, emb)
    profile = prof.parse(PROFILE)
    features = enc.encode(profile, nodes)
    results = []
    for run, threads in enumerate((1, 2, 2)):
        opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path), block_rows=7, threads=threads,
                                   max_candidates=21)  # k + 1 candidates: any other candidate shows
        folder = tmp_path / f"run{run}"
        results.append(staging.stage_matches(opts, profile, nodes, features, str(folder)))
        if run == 2:  # a resume after a kill: every third block (7 nodes) is computed again, the rest read back
            for marker in sorted((folder / "done").iterdir(), key=lambda m: int(m.name))[::3]:
                marker.unlink()
            results.append(staging.stage_matches(opts, profile, nodes, features, str(folder)))
    for neighbors, scores in results[1:]:
        assert np.array_equal(neighbors, results[0][0]) and np.array_equal(scores, results[0][1])


def test_an_ambiguous_check_is_confirmed_on_more_queries_within_its_budget(tmp_path, monkeypatch):
    """Where the target lies within the check's 95% interval, the check adds
    queries (drawn after its own, seeded) as far as costs.CHECK_SHARE of the plan's counted work
    pays for (calibrate.confirmation_floor at least), and records the estimate over both. The many-valued member of population.FAMILY
    at 20,000 nodes (750 search dims: a costly search per query) with a small check sample is
    such a case: its estimate over 128 queries is ambiguous; confirmed, it still agrees with this
    test's own recall; the matches are those of a run that does not confirm."""
    from mtool.match import calibrate

    n = 20_000
    cols, spec = popm.member("wide", n, 1)
    nodes = GroupNodes("g", "d", cols["reference_id"], {c: cols[c] for c in spec["keys"]}, cols["embedding"])
    profile = prof.parse(spec)
    features = enc.encode(profile, nodes)

    def run(name):
        # a small check sample (32 queries at least: 128 at this pool) leaves the check a budget
        opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path), recall_sample=32)
        stats = {}
        neighbors, _ = staging.stage_matches(opts, profile, nodes, features, str(tmp_path / name), stats)
        return neighbors, stats["quality"]["plans"][0]

    confirmed, after = run("confirmed")
    again, repeated = run("again")
    ambiguous = calibrate.ambiguous
    monkeypatch.setattr(calibrate, "ambiguous", lambda recall, lower, target: False)
    plain, before = run("plain")
    assert before["confirmation"] == 0 and before["sample"] == 128
    assert ambiguous(before["recall"], before["lower_95"], 0.99), before
    assert after["confirmation"] > 128 // 4 and after["sample"] == 128 + after["confirmation"]
    assert after["lower_95"] > before["lower_95"] and after["level"] == before["level"]
    assert np.array_equal(plain, confirmed)
    assert repeated == after and np.array_equal(again, confirmed)  # the same inputs add the same queries
    queries = np.random.default_rng(5).choice(n, 400, replace=False)
    hits = 0
    for q in queries:
        kth = exact_top_k(features, q, n, profile.k)[1][profile.k - 1]
        found = compat.pair_scores(features, np.array([q]), confirmed[q][None, confirmed[q] >= 0])[0]
        hits += min(profile.k, int((found >= kth - calibrate.SCORE_TOLERANCE).sum()))
    assert abs(after["recall"] - hits / (len(queries) * profile.k)) <= 0.01, (after, hits)


def test_a_pass_computed_again_calibrates_on_the_earlier_samples_and_checks_on_fresh_queries(tmp_path, monkeypatch):
    """At --target-recall 0.999 the first pass's narrowest width falls short at the check. The
    second pass reads its width off every query of the first pass's samples (calibration and
    check: their exact top K are known), strictly (the recall there must reach the target):
    the next width falls short there, so it takes the one after at once, instead of a pass at
    each. It is checked on queries none of those samples hold, seeded: a second run gives the
    same queries and the same matches."""
    from mtool.match import calibrate

    n = 12_000
    p = popm.population(n, seed=3)
    nodes = GroupNodes("g", "d", p["reference_id"], {c: p[c] for c in ("city", "age", "interests")}, p["embedding"])
    profile = prof.parse(popm.PROFILE)
    features = enc.encode(profile, nodes)
    seen = {"samples": [], "calibrated": [], "fresh": []}

    def spy(name, original):
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            seen[name].append((args, kwargs, out))
            return out
        monkeypatch.setattr(calibrate, original.__name__, call)

    spy("samples", calibrate.samples)
    spy("calibrated", calibrate.calibrate)
    spy("fresh", calibrate.fresh_sample)

    def run(name):
        for calls in seen.values():
            calls.clear()
        opts = engine.MatchOptions(profile, Device.CPU, staging_dir=str(tmp_path), target_recall=0.999)
        neighbors, _, stats = staging.stage_in_passes(opts, profile, nodes, features, str(tmp_path / name))
        return neighbors, stats

    neighbors, stats = run("one")
    assert stats["passes"] == 2 and stats["quality"]["warning"] is None
    (_, _, (sample_a, sample_b)), = seen["samples"]  # drawn by the first pass only
    first, second = seen["calibrated"]
    assert first[1].get("strict") is False and np.array_equal(first[0][2], sample_a)
    assert second[1].get("strict") is True
    assert sorted(second[0][2]) == sorted(np.concatenate([sample_a, sample_b]))  # the first pass's samples
    tried = second[0][5].tried
    assert [level for level, _ in tried] == [1, 2] and tried[0][1] < 0.999 <= tried[1][1], tried
    quality = stats["quality"]["plans"][0]
    assert quality["level"] == 2 and quality["recall"] >= 0.999 and quality["sample"] == len(sample_b)
    (_, _, fresh), = seen["fresh"]
    assert len(fresh) == len(sample_b) and not set(fresh) & set(np.concatenate([sample_a, sample_b]))
    again, repeated = run("two")
    assert np.array_equal(again, neighbors) and repeated["quality"] == stats["quality"]
    assert np.array_equal(seen["fresh"][0][2], fresh)
