"""The import-file contract (DESIGN.md section 3): schema checks for whole files and row checks
for each chunk, turning a decoded Arrow batch into per-group binary COPY payloads plus rejects.

A file that breaks the contract as a whole fails before anything is written; a row that breaks
it is rejected with its reason. All checks are vectorised over the batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from mtool.errors import InvalidInput, UsageError
from mtool.io.load_rows import encode_load_rows, uuid_matrix

REQUIRED = ("reference_id", "matched_reference_id", "compatibility_score")
OPTIONAL = ("group_id", "domain_id", "processing_cycle_id", "matched_at")
MAX_ID_CHARS = 255  # varchar(255) of the seed's table
MAX_CYCLE_CHARS = 36  # varchar(36)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# seq orders rows for "last row wins": file index in the high bits, row number in the file below.
ROWS_PER_FILE_BITS = 40

@dataclass(frozen=True)
class RowDefaults:
    """Values for optional columns a file lacks (or leaves null), fixed per job so that a
    resumed job writes the same rows: the job id as cycle, its creation time as matched_at."""

    group_id: str | None
    domain_id: str | None
    processing_cycle_id: str = "dry-run"
    matched_at_us: int = 0  # microseconds since 1970-01-01 UTC


def _is_stringish(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _is_stringish(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_score(t) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_integer(t)


def _is_uuidish(t) -> bool:
    import pyarrow as pa

    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    return _is_stringish(t) or (pa.types.is_fixed_size_binary(t) and t.byte_width == 16)


def _is_timestamp(t) -> bool:
    import pyarrow as pa

    return pa.types.is_timestamp(t)


EXPECTED = {
    "reference_id": (_is_stringish, "a string (string, large_string, string_view or dictionary)"),
    "matched_reference_id": (_is_stringish, "a string (string, large_string, string_view or dictionary)"),
    "compatibility_score": (_is_score, "a number (float32, float64 or decimal)"),
    "group_id": (_is_uuidish, "a UUID string or 16-byte fixed_size_binary"),
    "domain_id": (_is_uuidish, "a UUID string or 16-byte fixed_size_binary"),
    "processing_cycle_id": (_is_stringish, "a string"),
    "matched_at": (_is_timestamp, "a timestamp (any unit, with or without time zone, or int96)"),
}


def parse_mapping(pairs, contract: bool = True) -> tuple[tuple[str, str], ...]:
    """--map SRC=DST options as pairs; DST must be a column of the import contract unless
    `contract` is false (nodes import: any column, metadata keys included, may be renamed)."""
    out = []
    for pair in pairs or ():
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            raise UsageError(f"--map {pair!r} is not SRC=DST")
        if contract and dst not in REQUIRED + OPTIONAL:
            raise UsageError(f"--map {pair!r}: {dst!r} is not a column of the import contract",
                             hint=f"targets: {', '.join(REQUIRED + OPTIONAL)}")
        out.append((src, dst))
    return tuple(out)


@dataclass(frozen=True)
class ColumnPlan:
    """Which file column feeds each contract column (None: not in the file)."""

    source: dict = field(default_factory=dict)  # contract name -> file column name

    def has(self, name: str) -> bool:
        return self.source.get(name) is not None


def check_schema(schema, mapping, where: str, job_group: str | None, job_domain: str | None) -> ColumnPlan:
    """Map and type-check a file's columns; raise InvalidInput naming the file and column."""
    names = list(schema.names)
    renamed = {src: dst for src, dst in mapping}
    source = {}
    for col in names:
        target = renamed.get(col, col)
        if target in EXPECTED and target not in source:
            source[target] = col
    for name in REQUIRED:
        if name not in source:
            hint = f"the file has columns {', '.join(names) or '(none)'}; --map SRC={name} renames one"
            raise InvalidInput(f"{where}: required column {name!r} is missing", hint=hint)
    for name, col in source.items():
        ok, expected = EXPECTED[name]
        t = schema.field(col).type
        if not ok(t):
            label = repr(name) if col == name else f"{col!r} (as {name})"
            raise InvalidInput(f"{where}: column {label} has type {t}, expected {expected}",
                               hint="fix the producer, or --map a column of the right type")
    if "group_id" not in source and not job_group:
        raise UsageError(f"{where} has no group_id column and no --group-id was given",
                         hint="pass --group-id UUID (or --map a column to group_id)")
    if "domain_id" not in source and not job_domain:
        raise UsageError(f"{where} has no domain_id column and no --domain-id was given",
                         hint="pass --domain-id UUID (or --map a column to domain_id)")
    return ColumnPlan(source)


@dataclass
class GroupPayload:
    group_id: str
    rows: int
    payload: bytes  # binary COPY stream for the load table


@dataclass
class PreparedChunk:
    rows_in: int
    groups: list
    rejects: list  # (row_number, reason, record dict)


def _uuid_column(col, n: int, default: str | None):
    """(index per row, canonical UUID strings, bad-row reason array) for a UUID-ish column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if col is None:
        return np.zeros(n, np.int64), [default], np.zeros(n, bool), np.zeros(n, bool)
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode() if hasattr(col, "dictionary_decode") else col.cast(col.type.value_type)
    encoded = pc.dictionary_encode(col)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    canon, bad_dict = [], []
    for value in encoded.dictionary.to_pylist():
        try:
            u = uuid.UUID(bytes=value) if isinstance(value, bytes) else uuid.UUID(value.strip())
            canon.append(str(u))
            bad_dict.append(False)
        except (ValueError, AttributeError, TypeError):
            canon.append(None)
            bad_dict.append(True)
    idx = encoded.indices.to_numpy(zero_copy_only=False)
    nulls = np.asarray(encoded.indices.is_null().to_numpy(zero_copy_only=False), bool)
    idx = np.where(nulls, 0, idx).astype(np.int64)
    bad = np.asarray(bad_dict, bool)[idx] if canon else np.zeros(n, bool)
    bad &= ~nulls
    if default is not None:
        canon.append(default)
        idx = np.where(nulls, len(canon) - 1, idx)
        nulls = np.zeros(n, bool)
    return idx, canon, bad, nulls


def _mask(arr) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), bool)


def prepare_chunk(batch, plan: ColumnPlan, file_index: int, first_row: int,
                  defaults: RowDefaults) -> PreparedChunk:
    """Validate one decoded batch and encode its good rows as per-group COPY payloads."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    job_group, job_domain = defaults.group_id, defaults.domain_id

    def col(name):
        src = plan.source.get(name)
        return None if src is None else batch.column(src)

    ref = col("reference_id").cast(pa.large_string())
    mref = col("matched_reference_id").cast(pa.large_string())
    score64 = col("compatibility_score").cast(pa.float64())
    score = score64.to_numpy(zero_copy_only=False)  # nulls become NaN
    score_null = np.asarray(score64.is_null().to_numpy(zero_copy_only=False), bool)

    g_idx, g_canon, g_bad, g_null = _uuid_column(col("group_id"), n, job_group)
    d_idx, d_canon, d_bad, d_null = _uuid_column(col("domain_id"), n, job_domain)

    checks = [
        (np.asarray(ref.is_null().to_numpy(zero_copy_only=False), bool), "reference_id is null"),
        (np.asarray(mref.is_null().to_numpy(zero_copy_only=False), bool), "matched_reference_id is null"),
        (score_null, "compatibility_score is null"),
        (g_null, "group_id is null"),
        (g_bad, "group_id is not a valid UUID"),
        (d_null, "domain_id is null"),
        (d_bad, "domain_id is not a valid UUID"),
        (_mask(pc.equal(pc.binary_length(ref), 0)), "reference_id is empty"),
        (_mask(pc.equal(pc.binary_length(mref), 0)), "matched_reference_id is empty"),
        (_mask(pc.greater(pc.utf8_length(ref), MAX_ID_CHARS)), f"reference_id is longer than {MAX_ID_CHARS} characters"),
        (_mask(pc.greater(pc.utf8_length(mref), MAX_ID_CHARS)), f"matched_reference_id is longer than {MAX_ID_CHARS} characters"),
        (_mask(pc.match_substring(ref, "\x00")), "reference_id contains a NUL character"),
        (_mask(pc.match_substring(mref, "\x00")), "matched_reference_id contains a NUL character"),
        (~np.isfinite(score) & ~score_null, "compatibility_score is NaN or infinite"),
        (np.abs(np.nan_to_num(score)) > FLOAT32_MAX, "compatibility_score is out of range for real"),
    ]
    cycle = col("processing_cycle_id")
    if cycle is not None:
        cycle = cycle.cast(pa.large_string())
        checks.append((_mask(pc.greater(pc.utf8_length(cycle), MAX_CYCLE_CHARS)),
                       f"processing_cycle_id is longer than {MAX_CYCLE_CHARS} characters"))
        checks.append((_mask(pc.match_substring(cycle, "\x00")), "processing_cycle_id contains a NUL character"))

    reason = np.full(n, -1, np.int16)
    for i, (mask, _) in enumerate(checks):
        reason[(reason < 0) & mask] = i
    rejected = np.flatnonzero(reason >= 0)
    rejects = []
    if len(rejected):
        records = batch.take(pa.array(rejected)).to_pylist()
        for row, rec in zip(rejected.tolist(), records):
            rejects.append((first_row + row, checks[reason[row]][1],
                            {k: (None if v is None else str(v)) for k, v in rec.items()}))

    good = np.flatnonzero(reason < 0)
    groups = []
    if len(good):
        order = good[np.argsort(g_idx[good], kind="stable")]
        cuts = np.flatnonzero(np.diff(g_idx[order])) + 1
        domain_bytes = uuid_matrix(d_canon)
        if cycle is not None:
            cycle = pc.fill_null(cycle, defaults.processing_cycle_id)
        matched_us = None
        if col("matched_at") is not None:
            at = col("matched_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            matched_us = pc.fill_null(at, defaults.matched_at_us).to_numpy(zero_copy_only=False)
        for sel in np.split(order, cuts):
            m = len(sel)
            take = pa.array(sel)
            group_id = g_canon[g_idx[sel[0]]]
            seq = (np.int64(file_index) << ROWS_PER_FILE_BITS) + first_row + sel
            at_us = matched_us[sel] if matched_us is not None else np.full(m, defaults.matched_at_us, np.int64)
            payload = encode_load_rows(seq, group_id, domain_bytes[d_idx[sel]],
                                       cycle.take(take) if cycle is not None else defaults.processing_cycle_id,
                                       ref.take(take), mref.take(take), score[sel], at_us)
            groups.append(GroupPayload(group_id, m, payload))
    return PreparedChunk(n, groups, rejects)
