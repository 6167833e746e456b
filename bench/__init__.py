"""`selfsup bench`: the benchmark code beside its README."""
