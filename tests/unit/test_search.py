"""The list join's pieces against brute force: which lists a query probes, and which
candidates it keeps from them (the exact best by inner product over its probed lists)."""

from __future__ import annotations

import numpy as np
import pytest

from mtool.match import search


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def clustered(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(4, n // 400), d)).astype(np.float32)
    return (centres[rng.integers(0, len(centres), n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("width", [90, 512, 600, 1300])
def test_kth_largest_matches_a_full_sort(width):
    scores = np.random.default_rng(width).normal(size=(50, width)).astype(np.float32)
    assert np.array_equal(search._kth_largest(scores, 81), np.sort(scores, axis=1)[:, -81])


def test_probes_are_the_nearest_lists_within_the_margin():
    vectors = clustered(20_000)
    join = search.ListJoin(vectors)
    assert join.nlist > search.PROBE_MAX  # the cap applies
    queries = vectors[::97]
    probes = join.probes(queries)
    scores = queries @ join.centroid_vectors.T
    for q, row in enumerate(probes):
        ranked = np.argsort(-scores[q], kind="stable")
        reach = scores[q, ranked[0]] - search.PROBE_MARGIN * float(queries[q] @ queries[q])
        expected = [lst for i, lst in enumerate(ranked[:join.probe_max])
                    if i < search.PROBE_MIN or scores[q, lst] >= reach]
        assert row[:len(expected)].tolist() == expected
        assert (row[len(expected):] == -1).all()


@pytest.mark.parametrize("ties", [False, True])
def test_search_keeps_the_best_candidates_of_the_probed_lists(ties):
    """With ties (every vector twice: equal scores at the cut), which of the tied candidates is
    kept is arbitrary, so the kept scores are compared, not the ids."""
    vectors = clustered(10_000, seed=1)
    if ties:
        vectors = np.concatenate([vectors, vectors])
    join = search.ListJoin(vectors)
    queries = np.arange(0, len(vectors), 13)
    probes = join.pool_probes[queries]
    found = join.search(vectors[queries], probes, 81)
    for q, lists, kept in zip(queries, probes, found):
        members = np.concatenate([np.arange(join.starts[lst], join.starts[lst + 1]) for lst in lists[lists >= 0]])
        scores = join.vectors[members] @ vectors[q]
        best = np.sort(scores)[::-1][:81]
        assert len(set(kept.tolist())) == 81 and set(kept.tolist()) <= set(members.tolist())
        assert np.allclose(np.sort(join.vectors[kept] @ vectors[q])[::-1], best, rtol=0, atol=1e-5)
        if not ties:
            assert set(kept.tolist()) == set(members[np.argsort(-scores, kind="stable")[:81]].tolist())


def test_take_rows_is_a_view_only_for_a_run_of_consecutive_rows():
    array = np.arange(40).reshape(10, 4)
    run = search.take_rows(array, np.arange(3, 7))
    assert np.shares_memory(run, array) and np.array_equal(run, array[3:7])
    for index in (np.array([3, 5, 6]), np.array([6, 5, 4]), np.array([3, 3, 5])):  # [3, 3, 5] spans 3 rows
        rows = search.take_rows(array, index)
        assert not np.shares_memory(rows, array) and np.array_equal(rows, array[index])
    assert search.take_rows(array, np.array([], np.int64)).shape == (0, 4)


@pytest.mark.parametrize("ivf", ["scan", "faiss-cpu", pytest.param("faiss-gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(faiss_gpus() == 0, reason="no CUDA GPU for FAISS")])])
def test_pattern_join_ranks_by_the_formula_where_nodes_lack_keys(ivf):
    """Nodes lacking keys (of several presence patterns, a rare one among them): with every list
    probed, each query keeps the best candidates by the formula's score on the search vectors,
    (q . c + constant of the shared keys) / weight of the shared keys, as brute force gives.
    Also where the patterns' joins are FAISS IVF indexes (the GPU path, run with FAISS's CPU IVF
    here): each part's best by inner product, mapped to the formula and merged; and at the
    narrowest width those keep the same candidates as the scan."""
    from mtool.match import encode as enc
    from mtool.match import population as popm
    from mtool.match import profile as prof
    from mtool.match.nodes import GroupNodes

    n = 6_000
    cols, spec = popm.member("missing", n, seed=11, share=0.25)
    nodes = GroupNodes("g", "d", cols["reference_id"], {k: cols[k] for k in spec["keys"]}, cols["embedding"])
    features = enc.encode(prof.parse(spec), nodes)
    vecs, presence = enc.vectors(None, features, n), enc.Presence(features, n)
    pool = np.arange(n)
    join = search.PatternJoin(vecs, presence, pool, enc.key_spans(features), missing_zero=False)
    if ivf != "scan":
        for part in join.parts[:-1]:  # the rare patterns' join is scanned on the CPU on every device
            part.join.ivf_index = part.join.faiss_ivf(gpu=ivf == "faiss-gpu")
    sizes = [len(part[2].vectors) for part in join.parts]
    assert join.parts[-1][0] is None and min(sizes[:-1]) >= search.PATTERN_MIN  # the rare patterns share one join
    queries = np.arange(0, n, 61)
    queries = queries[presence.has[queries].any(axis=1)]  # a node without any key has no candidate
    terms = presence.query_terms(queries)
    wide = search.Setting(1, 10_000, 10.0, 10_000)  # every list of every part
    found = join.search(vecs[queries], join.probes(vecs[queries], wide, terms), 20, terms)
    for row, q in enumerate(queries):
        formula = formula_of(vecs, presence, q)
        kept = pool[join.order[found[row][found[row] >= 0]]]
        assert np.allclose(np.sort(formula[kept])[::-1], np.sort(formula)[::-1][:20], rtol=0, atol=1e-4)
    if ivf == "scan":
        return
    probes = join.probes(vecs[queries], search.LADDER[0], terms)
    by_ivf = join.search(vecs[queries], probes, 81, terms)
    for part in join.parts:
        part.join.ivf_index = None
    by_scan = join.search(vecs[queries], probes, 81, terms)
    for row, q in enumerate(queries):  # the same scores kept (equal scores may be other nodes)
        a, b = (pool[join.order[x[x >= 0]]] for x in (by_ivf[row], by_scan[row]))
        assert np.allclose(np.sort(formula_of(vecs, presence, q)[a]), np.sort(formula_of(vecs, presence, q)[b]),
                           rtol=0, atol=1e-4)


def formula_of(vecs, presence, q: int) -> np.ndarray:
    """Every node's score for query q by the formula on the search vectors (-inf: no shared key)."""
    shared = presence.has * presence.has[q]
    weight = shared @ presence.weight
    return np.where(weight > 0, (vecs @ vecs[q] + shared @ presence.constant) / np.where(weight > 0, weight, 1),
                    -np.inf)


def test_recall_counts_a_match_as_good_as_the_kth_best():
    """Ties at the K-th best score: an equally scored match is a hit, a lower one is not."""
    from mtool.match import calibrate

    exact = (np.array([[4, 5, 6], [1, -1, -1]]), np.float32([[0.9, 0.8, 0.8], [0.5, -np.inf, -np.inf]]))
    found = (np.array([[4, 7, 8], [1, 2, 3]]), np.float32([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]]))
    hits, totals = calibrate.recall_hits(found, exact)
    assert hits.tolist() == [2, 1] and totals.tolist() == [3, 1]


def test_a_confirmation_sample_is_disjoint_from_the_check_samples_and_seeded():
    """The queries a check adds are new ones (not the calibration's, not its own), the same on
    every call, and no more than the plan has; their count follows the plan's counted work."""
    from mtool.match import calibrate, costs

    queries = np.arange(1_000, 3_000)
    a, b = calibrate.samples(queries, 512, salt=3)
    c = calibrate.confirmation_sample(queries, 512, 700, salt=3)
    assert len(a) == 128 and len(b) == 512 and len(c) == 700
    assert not (set(a) | set(b)) & set(c) and set(c) <= set(queries)
    assert np.array_equal(c, calibrate.confirmation_sample(queries, 512, 700, salt=3))
    # at least one more check sample, while all samples stay within CHECK_PAIRS
    assert calibrate.confirmation_floor(512, 640, 100_000) == 360
    assert calibrate.confirmation_floor(128, 160, 20_000) == 128
    assert calibrate.confirmation_floor(128, 160, 1_000_000) == 0
    # the target within the estimate's 95% interval, on either side of the estimate
    assert calibrate.ambiguous(0.992, 0.988, 0.99) and calibrate.ambiguous(0.989, 0.985, 0.99)
    assert not calibrate.ambiguous(0.995, 0.991, 0.99) and not calibrate.ambiguous(0.98, 0.975, 0.99)
    assert len(calibrate.confirmation_sample(queries, 512, 5_000, salt=3)) == len(queries) - 640
    work = dict(scanned_pairs=10**9, dims=500, rescored_pairs=10**7, pool=100_000)
    more = costs.confirmation_queries(**work, spent_queries=0)
    assert more > 0 and costs.confirmation_queries(**work, spent_queries=more) == 0
    assert costs.confirmation_queries(**{**work, "scanned_pairs": 2 * 10**9}, spent_queries=0) > more


def required_features(n: int, seed: int):
    """Features with a required numeric key (NaN where missing, values on and off the scale's
    boundary), a required multi-value key over 100 items (two bitset words, some nodes without
    the key or with an empty set) and a key every node has (so no pair lacks a common key)."""
    from mtool.kernels.compat import Features

    rng = np.random.default_rng(seed)
    ages = rng.integers(18, 40, n).astype(np.float32) + rng.choice(np.float32([0, 0.1, 0.3]), n)
    ages[rng.random(n) < 0.1] = np.nan
    items = rng.random((n, 100)) < 0.1
    bits = np.zeros((n, 2), np.uint64)
    for word in range(2):
        chunk = items[:, word * 64:(word + 1) * 64]
        bits[:, word] = (chunk * (np.uint64(1) << np.arange(chunk.shape[1], dtype=np.uint64))).sum(axis=1,
                                                                                                   dtype=np.uint64)
    has = rng.random(n) > 0.1
    bits[~has] = 0
    return Features([(np.zeros(n, np.int32), 1.0, False)], [(ages, np.float32(3.2), 2.0, True)],
                    [(bits, has, 1.5, True)])


def test_required_keys_exclude_exactly_the_pairs_the_kernel_excludes():
    from mtool.kernels import compat

    n = 1500
    features = required_features(n, seed=3)
    pool = np.random.default_rng(4).permutation(n)  # list order: any permutation of the pool
    queries = np.arange(0, n, 7)
    allowed = search.RequiredKeys.of(features, pool).queries(queries)
    rows = np.arange(len(queries))
    scores = np.zeros((len(queries), n), np.float32)
    allowed.exclude(scores, rows, 0, n)
    kernel = compat.pair_scores(features, queries, np.broadcast_to(pool[None, :], (len(queries), n)))
    assert 0.2 < np.isinf(kernel).mean() < 0.98  # both kinds of pair occur
    assert np.array_equal(scores < 0, np.isinf(kernel))
    # a profile without required numeric or multi-value keys searches unfiltered
    assert search.RequiredKeys.of(compat.Features(features.categorical), pool) is None


def test_a_filtered_search_keeps_the_best_allowed_candidates():
    n = 6000
    vectors = clustered(n, seed=5)
    features = required_features(n, seed=6)
    join = search.ListJoin(vectors)
    pool = join.order  # node index of each list-order position
    required = search.RequiredKeys.of(features, pool)
    queries = np.arange(0, n, 31)
    probes = join.pool_probes[queries]
    found = join.search(vectors[queries], probes, 40, allowed=required.queries(queries))
    for row, (q, lists, kept) in enumerate(zip(queries, probes, found)):
        members = np.concatenate([np.arange(join.starts[lst], join.starts[lst + 1]) for lst in lists[lists >= 0]])
        passing = members[_passes(features, q, pool[members])]
        best = passing[np.argsort(-(join.vectors[passing] @ vectors[q]), kind="stable")[:40]]
        kept = kept[kept >= 0]
        if len(passing) >= 40:  # every slot holds an allowed pair, the best ones
            assert set(kept.tolist()) == set(best.tolist())
        else:  # the allowed pairs all, then excluded ones (the kernel drops them at rescoring)
            assert set(best.tolist()) <= set(kept.tolist())


def _passes(features, q: int, nodes: np.ndarray) -> np.ndarray:
    """Whether the pairs (q, nodes) pass the required keys, by the kernel."""
    from mtool.kernels import compat

    return ~np.isinf(compat.pair_scores(features, np.array([q]), nodes[None, :])[0])


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=[
    pytest.mark.gpu, pytest.mark.skipif(faiss_gpus() == 0, reason="no CUDA GPU for FAISS")])])
def test_the_gpu_path_searches_the_same_lists_and_probes_through_a_faiss_ivf_index(level, on_gpu):
    """The GPU path's scan (ListJoin.faiss_ivf + ivf_search: FAISS IVF with each query's own
    probes at the calibrated width), with FAISS's CPU IVF here and its GPU IVF where there is
    one: it keeps the same candidates as the CPU join, at the narrowest width and at a wider
    one, with the lists a query skips."""
    vectors = clustered(12_000, seed=7)
    join = search.ListJoin(vectors)
    join.ivf_index = join.faiss_ivf(gpu=on_gpu)
    queries = np.arange(0, len(vectors), 11)
    setting = search.LADDER[level]
    probes = join.probes(vectors[queries], setting)
    assert (probes == -1).any() and (probes[:, 0] >= 0).all()  # adaptive: rows scan different counts
    count = 20 * setting.oversample
    by_ivf = join.search(vectors[queries], probes, count)  # ivf_index set: the GPU path's code
    join.ivf_index = None
    by_join = join.search(vectors[queries], probes, count)
    for q, a, b in zip(queries, by_ivf, by_join):
        a, b = a[a >= 0], b[b >= 0]
        assert len(a) == len(b) == count
        # the same best scores (ties may be kept in another order), from the probed lists only
        assert np.allclose(np.sort(join.vectors[a] @ vectors[q]), np.sort(join.vectors[b] @ vectors[q]),
                           rtol=0, atol=1e-5)
        assert len(np.intersect1d(a, b)) >= count - 2
