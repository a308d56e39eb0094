"""Schema checks and row checks of the import contract, on Arrow data in memory."""

import decimal
import uuid

import numpy as np
import pyarrow as pa
import pytest

from mtool.ingest import contract
from mtool.errors import InvalidInput, UsageError

G = "11111111-1111-4111-8111-111111111111"
D = "22222222-2222-4222-8222-222222222222"


def batch(**cols):
    return pa.RecordBatch.from_pydict(cols)


def plan_for(b, mapping=(), group=G, domain=D):
    return contract.check_schema(b.schema, mapping, "f.parquet", group, domain)


@pytest.mark.parametrize("ids", [pa.string(), pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string())])
@pytest.mark.parametrize("score", [pa.float32(), pa.float64(), pa.decimal128(6, 4)])
def test_physical_variants_are_accepted(ids, score):
    values = [decimal.Decimal("0.5"), decimal.Decimal("0.25")] if pa.types.is_decimal(score) else [0.5, 0.25]
    b = pa.RecordBatch.from_arrays(
        [pa.array(["a", "b"]).cast(ids), pa.array(["c", "d"]).cast(ids), pa.array(values, score)],
        names=["reference_id", "matched_reference_id", "compatibility_score"])
    prepared = contract.prepare_chunk(b, plan_for(b), 0, 0, contract.RowDefaults(G, D))
    assert prepared.rejects == [] and sum(g.rows for g in prepared.groups) == 2


def test_missing_column_names_file_column_and_flag():
    b = batch(reference_id=["a"], compatibility_score=[0.1])
    with pytest.raises(InvalidInput) as err:
        plan_for(b)
    assert "f.parquet: required column 'matched_reference_id' is missing" in str(err.value)
    assert "--map" in err.value.hint


def test_wrong_type_names_the_column_and_expected_type():
    b = batch(reference_id=["a"], matched_reference_id=["b"], compatibility_score=["high"])
    with pytest.raises(InvalidInput, match="column 'compatibility_score' has type string, expected a number"):
        plan_for(b)


def test_mapping_renames_and_group_is_required_somewhere():
    b = batch(user=["a"], candidate=["b"], score=[0.5])
    plan = plan_for(b, mapping=(("user", "reference_id"), ("candidate", "matched_reference_id"),
                                ("score", "compatibility_score")))
    assert plan.source["reference_id"] == "user"
    with pytest.raises(UsageError, match="no group_id column and no --group-id"):
        contract.check_schema(b.schema, (("user", "reference_id"), ("candidate", "matched_reference_id"),
                                         ("score", "compatibility_score")), "f", None, D)


def test_bad_rows_are_rejected_with_their_reason():
    b = batch(
        reference_id=["ok", None, "a", "a", "a", "x" * 256, "a\x00b", "a", ""],
        matched_reference_id=["m", "m", "m", "m", "m", "m", "m", "m", "m"],
        compatibility_score=[0.5, 0.5, float("nan"), float("inf"), None, 0.5, 0.5, 1e39, 0.5],
        group_id=[G, G, G, G, G, G, G, "not-a-uuid", G],
    )
    prepared = contract.prepare_chunk(b, plan_for(b), 0, 100, contract.RowDefaults(None, D))
    reasons = {row: reason for row, reason, _ in prepared.rejects}
    assert reasons == {
        101: "reference_id is null",
        102: "compatibility_score is NaN or infinite",
        103: "compatibility_score is NaN or infinite",
        104: "compatibility_score is null",
        105: "reference_id is longer than 255 characters",
        106: "reference_id contains a NUL character",
        107: "group_id is not a valid UUID",
        108: "reference_id is empty",
    }
    assert sum(g.rows for g in prepared.groups) == 1
    record = next(rec for row, _, rec in prepared.rejects if row == 102)
    assert record["compatibility_score"] == "nan"


def test_rows_split_by_group_and_uuid_forms_canonicalised():
    g2 = str(uuid.uuid4())
    b = batch(reference_id=["a", "b", "c"], matched_reference_id=["x", "y", "z"], compatibility_score=[1.0, 2.0, 3.0],
              group_id=[G.upper(), g2, G])
    prepared = contract.prepare_chunk(b, plan_for(b), 0, 0, contract.RowDefaults(None, D))
    assert sorted((g.group_id, g.rows) for g in prepared.groups) == sorted([(G, 2), (g2, 1)])


def test_seq_orders_files_then_rows():
    assert (np.int64(1) << contract.ROWS_PER_FILE_BITS) > 10**12


def test_row_group_chunks_are_exact_row_ranges(tmp_path):
    """Checkpoints name chunks by index: chunk c must always be rows [c*B, (c+1)*B)."""
    import pyarrow.parquet as pq

    from mtool.io import sources

    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"x": list(range(10_000))}), path, row_group_size=10_000, data_page_size=1000,
                   write_batch_size=333)
    pf = pq.ParquetFile(path)
    chunks = [b.column("x").to_pylist() for b in sources.iter_row_group(pf, 0, 3_000, "f")]
    assert [len(c) for c in chunks] == [3000, 3000, 3000, 1000]
    assert sum(chunks, []) == list(range(10_000))
