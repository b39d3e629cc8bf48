"""ARC test-time-training submission kit: tasks -> augment -> format -> TTT -> infer -> vote -> submission."""
