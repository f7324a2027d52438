"""Model compression, an application: weight-only quantization, magnitude pruning, `raylm compress`."""
