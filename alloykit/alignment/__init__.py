"""Merging models trained separately: permutation groups traced from the model, a self-check,
statistics and similarities, solvers (Hungarian, zip), and transforms applied by the engine."""
