"""Training data and queries in: sources, rows, shards, the preflight and the input checks."""
