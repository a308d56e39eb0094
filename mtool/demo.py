"""`mtool demo`: the whole pipeline on sample data, on the embedded defaults (or --dsn).

1. sample nodes (a clustered population with city, age, interests and an embedding) are
   imported into `nodes`, and `mtool match` computes every node's top 10 as a new cycle;
2. a sample match file, as another engine would produce it, is imported with `mtool ingest`;
3. a summary: the import job, the match cycle, and the top matches of a few users."""

from __future__ import annotations

import os

from mtool import samples
from mtool.ingest import jobs as ingest
from mtool.db.connection import Database

DEMO_GROUPS = 4
MATCH_GROUP = "6d0c9e59-5b41-4c1e-9a4f-3f6f2a8e1d01"
NODES = 3_000
SHOWN_USERS = 3


def _write_nodes(path: str) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtool.match import population

    p = population.population(NODES, dim=16, seed=42)
    meta = [json.dumps({"city": c, "age": a, "interests": i}) for c, a, i in zip(p["city"], p["age"], p["interests"])]
    pq.write_table(pa.table({
        "reference_id": p["reference_id"], "group_id": [MATCH_GROUP] * NODES,
        "domain_id": [samples.DEMO_DOMAIN] * NODES, "metadata": meta,
        "embedding": pa.array(list(p["embedding"]), pa.list_(pa.float32())),
    }), path)


def run(db: Database, rows: int, state_dir: str) -> dict:
    from mtool.device import Device
    from mtool.match import engine, population
    from mtool.match import node_import
    from mtool.match import profile as prof

    folder = os.path.join(state_dir, "demo")
    os.makedirs(folder, exist_ok=True)
    nodes_path = os.path.join(folder, "sample-nodes.parquet")
    if not os.path.exists(nodes_path):
        _write_nodes(nodes_path)
    node_import.import_nodes(db, [nodes_path], state_dir=state_dir)
    profile = prof.parse({**population.PROFILE, "k": 10}, "demo profile")
    summary = engine.run(db, engine.MatchOptions(profile, Device.CPU, group_ids=(MATCH_GROUP,), force=True,
                                                 staging_dir=os.path.join(state_dir, "staging")))
    matches_path = os.path.join(folder, f"sample-matches-{rows}.parquet")
    if not os.path.exists(matches_path):
        samples.write_match_file(matches_path, rows, groups=DEMO_GROUPS, users=max(100, rows // 20))
    result = ingest.run_import(ingest.IngestOptions(uris=(matches_path,), replace=True), db, state_dir=state_dir)
    users = [f"u{i:08d}" for i in range(SHOWN_USERS)]
    with db.connect(autocommit=True) as conn:
        top = conn.execute(
            "SELECT m.reference_id, m.matched_reference_id, m.compatibility_score, n.metadata "
            "FROM potential_matches m JOIN nodes n ON n.group_id = m.group_id AND n.reference_id = m.matched_reference_id "
            "WHERE m.group_id = %s AND m.reference_id = ANY(%s) ORDER BY m.reference_id, m.compatibility_score DESC, "
            "m.matched_reference_id", (MATCH_GROUP, users)).fetchall()
        who = dict(conn.execute("SELECT reference_id, metadata FROM nodes WHERE group_id = %s AND reference_id = ANY(%s)",
                                (MATCH_GROUP, users)).fetchall())
        imported = conn.execute("SELECT count(*), count(DISTINCT group_id) FROM potential_matches "
                                "WHERE group_id = ANY(%s)", (samples.group_ids(DEMO_GROUPS),)).fetchone()
    cycle = summary.groups[0] if summary.groups else None
    return {
        "match": None if cycle is None else {"group_id": cycle.group_id, "status": cycle.status,
                                             "cycle_id": cycle.cycle_id, "nodes": cycle.nodes, "edges": cycle.edges,
                                             "seconds": round(cycle.seconds, 2), "error": cycle.error},
        "import": result.to_json(), "imported_rows": imported[0], "imported_groups": imported[1],
        "top_matches": [{"user": r, "user_profile": who.get(r), "match": m, "score": round(float(s), 3),
                         "match_profile": meta} for r, m, s, meta in top],
    }


def format_summary(summary: dict) -> str:
    lines = []
    m = summary["match"]
    if m:
        lines.append(f"match: group {m['group_id']} {m['status']}: {m['nodes']} nodes -> {m['edges']} matches "
                     f"(cycle {m['cycle_id']}, {m['seconds']} s)" + (f": {m['error']}" if m["error"] else ""))
    imp = summary["import"]
    lines.append(f"ingest: job {imp['job_id']} {imp['status']}"
                 + (" (already imported earlier)" if imp["already_imported"] else
                    f", {imp['processed_rows']:,} rows in {imp['duration_s']:.1f} s ({imp['rows_per_s']:,.0f} rows/s)")
                 + f"; {summary['imported_rows']:,} imported matches in {summary['imported_groups']} groups")
    shown: dict = {}
    for t in summary["top_matches"]:
        if t["user"] not in shown:
            shown[t["user"]] = 0
            lines.append(f"top matches of {t['user']} {t['user_profile']}:")
        if shown[t["user"]] < 3:
            shown[t["user"]] += 1
            lines.append(f"  {t['match']} score {t['score']}  {t['match_profile']}")
    return "\n".join(lines)
