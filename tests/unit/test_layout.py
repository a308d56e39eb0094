"""The layout's one rule (README, Layout): each job is a package, and no job imports another
job's package; what two jobs share lives in mtool/io, mtool/db or the top-level modules."""

from __future__ import annotations

import ast
import pathlib

import mtool

JOBS = ("ingest", "match", "consume")


def imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_job_imports_another_jobs_package():
    root = pathlib.Path(mtool.__file__).parent
    found = []
    for job in JOBS:
        for path in (root / job).glob("**/*.py") if (root / job).is_dir() else ():
            for module in imported_modules(path):
                other = [j for j in JOBS if j != job and (module == f"mtool.{j}" or module.startswith(f"mtool.{j}."))]
                if other:
                    found.append(f"{path.relative_to(root)} imports {module}")
    assert (root / "ingest").is_dir() and (root / "match").is_dir()
    assert not found, found


def test_shared_modules_import_no_job():
    root = pathlib.Path(mtool.__file__).parent
    shared = list((root / "io").glob("*.py")) + list((root / "db").glob("*.py"))
    bad = [f"{p.relative_to(root)} imports {m}" for p in shared for m in imported_modules(p)
           if any(m == f"mtool.{j}" or m.startswith(f"mtool.{j}.") for j in JOBS)]
    assert not bad, bad
