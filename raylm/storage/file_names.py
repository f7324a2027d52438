"""The names of the files raylm writes and reads in its folders, spelled once: data, runs, checkpoints, exports."""

# A prepared data folder and a checkpoint folder
MANIFEST_FILE = "manifest.json"  # every other file with its bytes and sha256; written last, read first
TOKENIZER_FILE = "tokenizer.json"  # the byte-level BPE tokenizer (data folder, checkpoint, export)

# A run folder (and each checkpoint of it)
CONFIG_FILE = "config.yaml"  # the resolved run config
METRICS_FILE = "metrics.jsonl"  # one JSON row per step in the run folder
LOSS_PLOT_FILE = "loss.png"  # the loss curve drawn from metrics.jsonl
HANGS_DIR = "hangs"  # hangs/<time>/rank-NNNNN.txt: where each live rank was when a worker group hung

# An export folder (Hugging Face Llama layout)
HF_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
RAYLM_CONFIG_FILE = (
    "raylm_config.yaml"  # the run config, so `raylm generate` knows the tokenizer's vocab size
)

# A sweep folder
DECISIONS_FILE = "decisions.jsonl"  # every rung and PBT decision, one JSON row each
