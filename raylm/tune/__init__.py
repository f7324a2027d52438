"""Ray Tune sweeps over raylm runs: search spaces from tune_spaces/ YAML, ASHA early stopping on tokens."""
