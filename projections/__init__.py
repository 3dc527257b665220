"""DuckDB projections folded from the event log."""
