"""Pruning methods that train: GOHSP (graph-based head ranking + ADMM soft pruning, :mod:`.gohsp`)."""
