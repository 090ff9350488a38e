"""Stage-one data: task sources, verifiable rewards and the DuckDB/Parquet trajectory store."""
