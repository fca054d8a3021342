"""The influence audit: fit and score, candidates, prefilter, gradient index, verification, evaluation, report."""
