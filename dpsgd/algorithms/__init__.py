"""Communication patterns: the loops that order train, pack, exchange, merge, evaluate, log."""
