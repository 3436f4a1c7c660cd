"""Proofs for a pruned model: checker + ORT (:mod:`.checks`, run on every
output) and the zero-contribution oracle (:mod:`.oracle`, ``onnxprune verify``)."""
