"""File names inside one checkpoint folder: one model file and one optimizer file per pipeline layer, plus small state.

    step-00000200/
      manifest.json                 written last: every other file with its bytes and sha256
      config.yaml                   the resolved run config
      trainer_state.json            the caller's dict (step, tokens, data offset, ...)
      engine.json                   AdamW step count, learning rate, DeepSpeed counters
      tokenizer.json                when the run's data folder has one
      model/003-layers.2.pt         {full parameter name: full fp32 tensor} of pipeline layer 3
      optim/003-layers.2.pt         {full parameter name: {"exp_avg": ..., "exp_avg_sq": ...}}, full tensors
      ranks/rank-00005.pt           the caller's per-rank state (RNG), restored only under the same layout

Layer indices are raylm.model.facts.layer_index's: embedding 0, blocks 1..n_layer, final norm n_layer + 1,
untied head n_layer + 2. Pure functions here, so export never imports DeepSpeed.
"""

from __future__ import annotations

from raylm.model.facts import layer_index, layer_name

MODEL_DIR = "model"
OPTIM_DIR = "optim"
RANKS_DIR = "ranks"
TRAINER_STATE_FILE = "trainer_state.json"
ENGINE_STATE_FILE = "engine.json"


def layer_file(param_name: str, n_layer: int) -> str:
    """'003-layers.2.pt': the file (under model/ and optim/) that holds a parameter's layer; sorts in layer order."""
    return f"{layer_index(param_name, n_layer):03d}-{layer_name(param_name)}.pt"


def model_file(param_name: str, n_layer: int) -> str:
    return f"{MODEL_DIR}/{layer_file(param_name, n_layer)}"


def optim_file(param_name: str, n_layer: int) -> str:
    return f"{OPTIM_DIR}/{layer_file(param_name, n_layer)}"


def rank_file(rank: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.pt"
