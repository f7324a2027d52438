"""3D parallelism applied to the GPT from outside: topology, Megatron TP layers, DeepSpeed pipeline or plain engine.

Import raylm.parallel.engine for `init_distributed`, `build_engine` and `Engine` (it imports DeepSpeed). Every use
of DeepSpeed's internals lives in this package; checkpoints go through Engine.save_state / load_state.
"""
