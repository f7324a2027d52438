"""Model compression: weight-only quantization, magnitude pruning, the compressed folder format, `raylm compress`."""
