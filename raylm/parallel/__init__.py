"""3D parallelism applied to the GPT from outside: topology, Megatron TP layers, DeepSpeed pipeline engine.

Import raylm.parallel.engine for `init_distributed` and `build_engine` (it imports DeepSpeed).
"""
