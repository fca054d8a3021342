"""The query-free data-quality audit: per-document signals, issues, report, checks and stages."""
