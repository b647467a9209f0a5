"""Data the service resolves before training: named splits, the cached skeleton chain, generated data sets,
prepared data to features."""
