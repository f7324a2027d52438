"""raylm's GPT <-> Hugging Face LlamaForCausalLM: parameter names, RoPE row order and config.json, both ways.

Pure functions, no I/O: `raylm export` writes with them and `raylm.model.hf_weights` reads with them.
raylm's RoPE rotates interleaved pairs (x[2k], x[2k+1]); HF's Llama rotates halves (x[k], x[k + hd/2]). So the
output rows of wq and wk are permuted within each head exactly as HF's convert_llama_weights_to_hf does. The
permutation never moves a row out of its head, so it commutes with slicing whole heads (what TP does).
"""

from __future__ import annotations

import torch

from raylm.config.derived import ffn_hidden, kv_heads
from raylm.config.rope import normalized, rope_scaling_problem
from raylm.config.schema import ModelConfig

HF_LLAMA_NAMES = {
    "tok_embeddings": "model.embed_tokens",
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "norm": "model.norm",
    "output": "lm_head",
}

ROTARY = ("attention.wq.weight", "attention.wk.weight")
LLAMA_TYPE, LLAMA_ARCH = "llama", "LlamaForCausalLM"


def hf_name(name: str) -> str:
    """raylm name -> LlamaForCausalLM name: layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    module, leaf = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, idx, rest = module.split(".", 2)
        return f"model.layers.{idx}.{HF_LLAMA_NAMES[rest]}.{leaf}"
    return f"{HF_LLAMA_NAMES[module]}.{leaf}"


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from RoPE pairs (2k, 2k+1) to halves (k, k + head_dim/2): HF's permute."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, model: ModelConfig) -> int:
    """Heads whose rows a parameter's RoPE permutation works within: n_head for wq, kv heads for wk, else 0."""
    if name.endswith(ROTARY[0]):
        return model.n_head
    if name.endswith(ROTARY[1]):
        return kv_heads(model)
    return 0


def to_hf_tensor(name: str, t: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """A full raylm tensor in HF's layout (wq/wk rows permuted to rotate-half order)."""
    heads = rotary_heads(name, model)
    return interleaved_to_half(t, heads) if heads else t


def hf_config(model: ModelConfig, vocab_rows: int, token_ids: dict[str, int | None]) -> dict:
    """config.json for LlamaForCausalLM; vocab_size is the embedding's (padded) row count, since HF sizes the
    embedding from it; token_ids holds bos/eos/pad_token_id (None where the tokenizer has no such token)."""
    return {
        "architectures": [LLAMA_ARCH],
        "model_type": LLAMA_TYPE,
        "torch_dtype": "float32",
        "vocab_size": vocab_rows,
        "hidden_size": model.d_model,
        "intermediate_size": ffn_hidden(model),
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": kv_heads(model),
        "head_dim": model.d_model // model.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": dict(model.rope_scaling) or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "use_cache": True,
        **token_ids,
    }


def unsupported_settings(config: dict) -> list[str]:
    """The config.json settings raylm's GPT cannot represent, as 'key=value' (empty: it can load this model)."""
    heads, width = config.get("num_attention_heads", 1), config.get("hidden_size", 0)
    rope_problem = rope_scaling_problem(normalized(config.get("rope_scaling")))
    bad = {
        "rope_scaling": rope_problem is not None,
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
        "head_dim": config.get("head_dim") not in (None, width // heads),
    }
    why = {"rope_scaling": f" ({rope_problem})"}
    return [f"{key}={config.get(key)!r}{why.get(key, '')}" for key, is_bad in bad.items() if is_bad]


def model_settings(config: dict) -> dict:
    """raylm `model` section values from a Llama config.json (call unsupported_settings first)."""
    return {
        "n_layer": config["num_hidden_layers"],
        "n_head": config["num_attention_heads"],
        "n_kv_head": config.get("num_key_value_heads", config["num_attention_heads"]),
        "d_model": config["hidden_size"],
        "ffn_hidden": config["intermediate_size"],
        "max_seq_len": config["max_position_embeddings"],
        "rope_theta": config.get("rope_theta", 10000.0),
        "rope_scaling": normalized(config.get("rope_scaling")),
        "norm_eps": config["rms_norm_eps"],
        "tie_embeddings": config.get("tie_word_embeddings", False),
        "init_std": config.get("initializer_range", 0.02),
    }


# the model settings a folder must agree on, with HF's key; max_seq_len is free (RoPE is computed per position)
HF_KEYS = {
    "n_layer": "num_hidden_layers",
    "d_model": "hidden_size",
    "ffn_hidden": "intermediate_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def differing_settings(config: dict, model: ModelConfig) -> list[tuple[str, str, object, object]]:
    """(raylm key, HF key, folder value, this model's value) for every setting on which they differ."""
    folder = model_settings(config)
    mine = {
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_kv_head": kv_heads(model),
        "d_model": model.d_model,
        "ffn_hidden": ffn_hidden(model),
        "rope_theta": model.rope_theta,
        "rope_scaling": model.rope_scaling,
        "norm_eps": model.norm_eps,
        "tie_embeddings": model.tie_embeddings,
    }
    return [(key, HF_KEYS[key], folder[key], value) for key, value in mine.items() if folder[key] != value]
