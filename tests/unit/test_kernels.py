"""The compatibility kernel and top-K against an independent pure-Python reference, through
NumPy and (when a GPU is present) CuPy; the CUDA source compiles with nvcc."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from mtool.device import gpu_available
from mtool.kernels import compat
from mtool.match import encode as enc
from mtool.match import profile as prof
from mtool.match.nodes import GroupNodes
from tests.integration.match_helpers import PROFILE, make_nodes, score

XPS = ["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not gpu_available(),
                                                                                 reason="no CUDA GPU")])]


def group_of(rows):
    metas = [json.loads(r["metadata"]) for r in rows]
    keys = {k for m in metas for k in m}
    emb = np.array([r["embedding"] if r["embedding"] else [np.nan] * 4 for r in rows], np.float32)
    return GroupNodes("g", "d", [r["reference_id"] for r in rows], {k: [m.get(k) for m in metas] for k in keys}, emb)


def to_xp(features, xp):
    from mtool.match.rescore import _to_device

    return _to_device(features, xp)


@pytest.mark.parametrize("missing", ["skip", "zero"])
@pytest.mark.parametrize("xp_name", XPS)
def test_pair_scores_equal_the_reference_formula(xp_name, missing):
    xp = pytest.importorskip(xp_name)
    rows = make_nodes(120, "g", "d", seed=9)
    spec = {**PROFILE, "missing": missing}
    profile = prof.parse(spec)
    features = to_xp(enc.encode(profile, group_of(rows)), xp)
    n = len(rows)
    q = xp.arange(n)
    c = xp.broadcast_to(xp.arange(n)[None, :], (n, n))
    got = compat.pair_scores(features, q, c)
    got = got.get() if hasattr(got, "get") else got
    nodes = [{"id": r["reference_id"], "meta": json.loads(r["metadata"]), "emb": r["embedding"]} for r in rows]
    for i in range(0, n, 7):
        for j in range(n):
            want = score(spec, nodes[i], nodes[j])
            if want is None:
                assert got[i, j] == -np.inf
            else:
                assert got[i, j] == pytest.approx(round(want, 6), abs=2e-6), (i, j)


@pytest.mark.parametrize("xp_name", XPS)
def test_top_k_breaks_ties_by_rank_and_pads(xp_name):
    xp = pytest.importorskip(xp_name)
    scores = xp.asarray([[0.5, 0.9, 0.5, -np.inf], [0.1, -np.inf, -np.inf, -np.inf]], dtype=xp.float32)
    cands = xp.asarray([[7, 3, 2, 9], [4, 5, 6, 8]])
    rank = xp.arange(10)
    idx, best = compat.top_k(scores, cands, rank, 3)
    idx = idx.get() if hasattr(idx, "get") else idx
    assert idx.tolist() == [[3, 2, 7], [4, -1, -1]]


def test_top_k_whole_row_sort_equals_the_partition_path(monkeypatch):
    """Short rows sort a key with the column packed in; long rows partition first. Both give
    the same neighbours and scores, ties (many here: 50 score levels) broken by rank."""
    rng = np.random.default_rng(4)
    scores = (rng.integers(0, 50, (300, 81)) / 50).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    candidates = np.stack([rng.choice(5000, 81, replace=False) for _ in range(300)])
    rank = rng.permutation(5000)
    packed = compat.top_k(scores, candidates, rank, 20)
    monkeypatch.setattr(compat, "WHOLE_ROW_SORT_MAX", 0)
    partitioned = compat.top_k(scores, candidates, rank, 20)
    assert np.array_equal(packed[0], partitioned[0]) and np.array_equal(packed[1], partitioned[1])
    first = packed[0][0]
    s = dict(zip(candidates[0], scores[0]))
    assert [s[c] for c in first] == sorted((s[c] for c in first), reverse=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles(tmp_path):
    from importlib import resources

    src = resources.files("mtool.kernels").joinpath("compat.cu")
    proc = subprocess.run(["nvcc", "--ptx", "-o", str(tmp_path / "compat.ptx"), str(src)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pair_scores_fused" in (tmp_path / "compat.ptx").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")
def test_fused_cuda_kernel_matches_numpy():
    import cupy

    from mtool.kernels.cuda import pair_scores_gpu

    rows = make_nodes(200, "g", "d", seed=3)
    profile = prof.parse({**PROFILE, "keys": {k: v for k, v in PROFILE["keys"].items() if v["type"] != "multi"}})
    features = enc.encode(profile, group_of(rows))
    q, c = np.arange(200), np.broadcast_to(np.arange(200)[None, :], (200, 200))
    want = compat.pair_scores(features, q, c)
    got = pair_scores_gpu(to_xp(features, cupy), cupy.asarray(q), cupy.asarray(c)).get()
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pool_top_k_in_slices_equals_the_whole_row_top_k(monkeypatch, symmetric):
    """The recall check's exact top K scans a large pool in column slices and keeps from each
    only what reaches the K-th best so far (the first slice: its own K-th best, or K+1-th where
    the query itself is in it); the result must be the whole row's top K, ties and required-key
    exclusions (a third of the pairs here) included."""
    from mtool.match import rescore

    n, k = 3000, 20
    rows = make_nodes(n, "g", "d", seed=5)
    features = rescore.work_features_on(enc.encode(prof.parse({**PROFILE, "k": k}), group_of(rows)), np.arange(n),
                                        np)
    monkeypatch.setattr(rescore, "PAIR_BUDGET", 20_000)  # a pool this small scanned in slices...
    monkeypatch.setattr(rescore, "SCAN_PAIRS", 20_000)  # ...of 1,024 columns, 64 queries at once
    offset, pool = (0, n) if symmetric else (1000, n - 1000)
    queries = np.arange(0, n, 23) if symmetric else np.arange(0, 1000, 7)
    rank = np.arange(n)
    got_nb, got_sc = rescore.top_k_for(queries, None, offset, pool, features, rank, k, np, symmetric)
    cols = np.arange(offset, offset + pool)
    scores = compat.pair_scores(features, queries, np.broadcast_to(cols[None, :], (len(queries), pool)))
    if symmetric:
        scores[cols[None, :] == queries[:, None]] = compat.EXCLUDED
    want_nb, want_sc = compat.top_k(scores, np.broadcast_to(cols[None, :], scores.shape), rank, k)
    assert np.isinf(scores).mean() > 0.2
    np.testing.assert_array_equal(got_sc, want_sc)
    np.testing.assert_array_equal(got_nb, want_nb)
