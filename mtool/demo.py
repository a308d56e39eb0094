"""`mtool demo`: generate a sample match file, import it, and summarise what landed."""

from __future__ import annotations

import os

import numpy as np

from mtool import ingest, samples
from mtool.db.connection import Database

DEMO_GROUPS = 4


def run(db: Database, rows: int, state_dir: str) -> dict:
    os.makedirs(os.path.join(state_dir, "demo"), exist_ok=True)
    path = os.path.join(state_dir, "demo", f"sample-matches-{rows}.parquet")
    if not os.path.exists(path):
        samples.write_match_file(path, rows, groups=DEMO_GROUPS, users=max(100, rows // 20))
    opts = ingest.IngestOptions(uris=(path,), replace=True)
    result = ingest.run_import(opts, db, state_dir=state_dir)
    with db.connect(autocommit=True) as conn:
        per_group = conn.execute(
            "SELECT group_id, count(*), count(DISTINCT reference_id), avg(compatibility_score) FROM potential_matches "
            "WHERE group_id = ANY(%s) GROUP BY group_id ORDER BY group_id",
            (samples.group_ids(DEMO_GROUPS),)).fetchall()
        top = conn.execute(
            "SELECT group_id, reference_id, matched_reference_id, compatibility_score FROM potential_matches "
            "WHERE group_id = %s AND reference_id = ANY(%s) ORDER BY reference_id, compatibility_score DESC",
            (samples.group_ids(DEMO_GROUPS)[0], samples.user_ids(np.arange(2)).to_pylist())).fetchall()
    return {"file": path, "import": result.to_json(),
            "groups": [{"group_id": str(g), "matches": n, "users": u, "avg_score": round(float(a), 3)}
                       for g, n, u, a in per_group],
            "top_matches": [{"group_id": str(g), "user": r, "match": m, "score": round(float(s), 3)}
                            for g, r, m, s in top]}


def format_summary(summary: dict) -> str:
    imp = summary["import"]
    lines = [f"sample file: {summary['file']}",
             f"import job {imp['job_id']}: {imp['status']}"
             + (" (already imported earlier)" if imp["already_imported"] else
                f", {imp['processed_rows']} rows in {imp['duration_s']:.1f} s ({imp['rows_per_s']:,.0f} rows/s)"),
             "groups:"]
    lines += [f"  {g['group_id']}: {g['matches']} matches for {g['users']} users, avg score {g['avg_score']}"
              for g in summary["groups"]]
    lines.append("top matches of two users:")
    shown: dict = {}
    for t in summary["top_matches"]:
        if shown.setdefault(t["user"], 0) < 5:  # the five best of each
            shown[t["user"]] += 1
            lines.append(f"  {t['user']} -> {t['match']} ({t['score']})")
    return "\n".join(lines)
