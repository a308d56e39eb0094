"""The potential-matches engine: nodes, match profiles, candidate search, exact rescoring,
top-K, Zarr staging and the per-group cycle written to potential_matches."""
