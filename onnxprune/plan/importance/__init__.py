"""Importance criteria: magnitude (l1, l2), random, normalisation scale,
activations and first/second-order Taylor on calibration data, and GOHSP's
graph-based head ranking (GOHSP, Alg. 2)."""
