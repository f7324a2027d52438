"""raylm: pre-train GPT-style language models on Ray (Ray Data, Ray Train + DeepSpeed 3D parallelism, Ray Tune)."""

__version__ = "0.1.0"
