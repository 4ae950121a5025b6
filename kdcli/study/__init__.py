"""Studies: grids of runs (configurations x folds x seeds), their ledger, aggregation, statistics and reports."""
