"""A Llama-family decoder in plain single-device PyTorch: the model that `raylm.parallel` shards and pipelines.

Architecture: token embedding -> n_layer x [RMSNorm -> causal GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (optionally tied to the embedding). No biases.

Parameter names follow Meta's Llama checkpoints, so export is a rename (raylm.model.hf_llama.HF_LLAMA_NAMES):

    tok_embeddings.weight                    model.embed_tokens.weight
    layers.{i}.attention_norm.weight         model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.wq|wk|wv|wo.weight  model.layers.{i}.self_attn.q_proj|k_proj|v_proj|o_proj.weight
    layers.{i}.ffn_norm.weight               model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1|w3|w2.weight  model.layers.{i}.mlp.gate_proj|up_proj|down_proj.weight
    norm.weight                              model.norm.weight
    output.weight (absent when tied)         lm_head.weight

RoPE rotates interleaved pairs (x[2k], x[2k+1]) as Meta's reference code does; Hugging Face's Llama rotates
halves, so an HF export must permute the rows of wq and wk exactly as HF's convert_llama_weights_to_hf does.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylm.config.derived import ffn_hidden, kv_heads
from raylm.config.schema import ModelConfig
from raylm.model.rope import model_rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) * self.weight

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x scaled to unit root-mean-square over the last dim, before the gain, in x's dtype."""
        # normalise in fp32 so bf16 activations do not lose the small variances
        x_f32 = x.float()
        x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_f32.type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2k], x[2k+1]) of x (B, T, H, hd) by the position's angle; cos/sin are (T, hd/2), or
    (B, T, hd/2) when each row has its own positions (document masking, a left-padded decode batch)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    cos = cos[..., None, :, None]  # (T | B, T, 1, hd/2, 1): broadcast over heads and the pair
    sin = sin[..., None, :, None]
    # (even, odd) -> (even cos - odd sin, odd cos + even sin) = pairs cos + (-odd, even) sin: the same roundings
    # as the four products, in three kernels and one stack instead of six and one
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1)  # (B, T, H, hd/2, 2)
    return (pairs * cos + swapped * sin).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and RoPE.

    Head counts are read from the projections' output widths, so the same code runs on a tensor-parallel
    shard whose wq/wk/wv hold only this rank's heads. `core` maps the rotated q and the k, v to the attended
    values (attention_core); raylm.parallel swaps it from outside (context parallelism) and the rest stays.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv_heads(cfg) * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv_heads(cfg) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.core: Callable[..., torch.Tensor] = attention_core

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` (B, 1, T, T) bool, True where a query may see a key, replaces the causal mask (documents)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, Hq, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        qk = apply_rope(torch.cat((q, k), dim=2), cos, sin)  # (B, T, Hq + Hkv, hd): one rotation for both
        q, k = qk.split((q.size(2), k.size(2)), dim=2)
        if cache is not None:
            k, v = cache.append(k.transpose(1, 2), v.transpose(1, 2))  # (B, Hkv, S, hd): every key so far
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, Hkv, hd), S = cache.start + T
            if cache.mask is not None:
                mask = cache.mask  # (B, 1, T, S) for a left-padded batch
        y = self.core(q, k, v, mask)  # (B, T, Hq, hd)
        return self.wo(y.reshape(B, T, -1))  # (B, T, C)


def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA of queries (B, T, Hq, hd) over keys and values (B, S, Hkv, hd) -> (B, T, Hq, hd). `mask` (bool,
    broadcastable to (B, Hq, T, S)) says which keys each query sees; None is causal, the T queries being the
    last T of the S positions."""
    T, S = q.size(1), k.size(1)
    causal = mask is None and S == T
    mask = causal_mask(T, S, q.device) if mask is None else mask  # (T, S), (B, 1, T, S) or None
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T | S, hd)
    # enable_gqa lets each group of Hq / Hkv query heads read its kv head in place (no repeat_interleave copy)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )  # (B, Hq, T, hd)
    return y.transpose(1, 2)  # (B, T, Hq, hd)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """Which of S keys each of the last T queries may see, (T, S) bool, or None where SDPA needs no mask.

    Training and the first chunk of a decode have S == T (is_causal does it); a one-token decode step sees every
    cached key. A later chunk of several tokens needs the diagonal shifted right by the S - T cached keys:
    is_causal alone would align it top-left and hide them."""
    if S == T or T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # (T, S)


def document_attention(
    doc_ids: torch.Tensor, positions: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For packed windows of several documents: the mask (B, 1, T, T) that keeps attention causal within each
    document, and the RoPE tables (B, T, hd/2) at each token's position. doc_ids and positions are (B, T)."""
    T = doc_ids.size(1)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return (same_doc & causal)[:, None], rope_cos[positions], rope_sin[positions]


class LayerCache:
    """One layer's keys and values for KV-cache decoding: buffers (B, Hkv, max_seq_len, hd), `start` filled, and
    the forward's attention mask when the batch is left-padded."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, mask: torch.Tensor | None = None):
        self.k, self.v, self.start, self.mask = k, v, start, mask

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's keys and values (B, Hkv, T, hd) after the cached ones; return all of them."""
        end = self.start + k.size(2)
        self.k[:, :, self.start : end] = k
        self.v[:, :, self.start : end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, end, hd) views, no copy


class KVCache:
    """Every layer's cached keys and values for one batch of sequences, and how many slots are filled.

    Positions are absolute (RoPE is applied before caching), so the cache holds at most max_seq_len tokens;
    the caller decides what to do when it is full (raylm.model.sampling re-encodes a shorter window).

    A batch of prompts of different lengths is left-padded: `pad[b]` (B,) slots at the start of row b hold
    padding, which no other token attends to, and row b's token in slot s sits at RoPE position s - pad[b], so
    each row computes what it would alone. Without `pad` every row starts at slot 0 and needs no mask."""

    def __init__(self, model: GPT, batch: int, pad: torch.Tensor | None = None):
        cfg, weight = model.cfg, model.tok_embeddings.weight
        shape = (cfg.n_layer, batch, kv_heads(cfg), cfg.max_seq_len, cfg.d_model // cfg.n_head)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, B, Hkv, max_seq_len, hd)
        self.v = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, B, Hkv, max_seq_len, hd)
        self.pos = 0  # slots filled so far = the slot of the next token
        self.max_seq_len = cfg.max_seq_len
        self.pad = None if pad is None else pad.to(weight.device)  # (B,) padding slots of each row, or None
        slots = torch.arange(cfg.max_seq_len, device=weight.device)
        # (B, 1, 1, max_seq_len): which slots hold a row's own tokens (padding is never attended to)
        self.real = None if self.pad is None else (slots >= self.pad[:, None])[:, None, None, :]
        self.padded = 0 if pad is None else int(pad.max())  # slots before which some row still pads

    def positions(self, T: int) -> slice | torch.Tensor:
        """The RoPE table rows of the next T tokens: a slice shared by every row, or (B, T) per row when padded."""
        if self.pad is None:
            return slice(self.pos, self.pos + T)
        slots = torch.arange(self.pos, self.pos + T, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T): padding slots take position 0

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """Which of the S = pos + T slots each of the next T tokens attends to, (B, 1, T, S) bool, or None when
        unpadded (causal_mask does it). A padding slot sees itself only, so no row of the softmax is empty."""
        if self.real is None:
            return None
        S = self.pos + T
        real = self.real[..., :S]  # (B, 1, 1, S)
        if T == 1 and self.pos >= self.padded:
            return real  # one token past every row's padding: it sees every real slot so far, itself included
        slots = torch.arange(S, device=real.device)
        query = slots[self.pos :, None]  # (T, 1): the new tokens' slots
        return (slots <= query) & (real | (slots == query))  # (B, 1, T, S)

    def layer(self, i: int, mask: torch.Tensor | None = None) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.pos, mask)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)


class GPT(nn.Module):
    """The whole decoder on one device; `vocab_size` is the padded vocabulary (embedding rows)."""

    rope_cos: torch.Tensor  # buffers (register_buffer), declared for the type checker
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # a tied head reuses tok_embeddings.weight, so no output.weight exists in the state dict
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def head_weight(self) -> torch.Tensor:
        """The LM head matrix (vocab, C): the embedding itself when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        documents: tuple[torch.Tensor, torch.Tensor] | None = None,
        last_only: bool = False,
    ):
        """Logits (B, T, vocab), or the mean cross-entropy over targets != -100 when targets are given;
        (B, 1, vocab) of the last token only with `last_only` (decoding needs no more).

        With a cache, idx holds only the tokens after the cached ones: they take slots cache.pos onwards,
        attend to the cached keys too (not to a padded batch's padding), and are appended to the cache.
        `documents` = (doc_ids, positions), each (B, T): attention stays within each document and RoPE takes the
        given positions (training only)."""
        T = idx.size(1)
        start = 0 if cache is None else cache.pos
        assert start + T <= self.cfg.max_seq_len, f"{start} + {T} positions exceed the RoPE tables"
        rows = slice(0, T) if cache is None else cache.positions(T)
        cos, sin = self.rope_cos[rows], self.rope_sin[rows]  # (T, hd/2), or (B, T, hd/2) for a padded batch
        mask = None if cache is None else cache.attention_mask(T)  # (B, 1, T, S) for a padded batch
        if documents is not None:
            assert cache is None, "document masking is for training windows, not KV-cache decoding"
            mask, cos, sin = document_attention(*documents, self.rope_cos, self.rope_sin)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(i, mask), mask)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = F.linear(self.norm(x), self.head_weight())  # (B, T | 1, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, parameter name): stable across processes and construction order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(cfg: ModelConfig, name: str) -> float:
    """Normal std for a matrix; residual output projections are scaled down by 1/sqrt(2 n_layer) (GPT-2)."""
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layer)
    return cfg.init_std


class _SkipModuleInit(torch.overrides.TorchFunctionMode):
    """Makes torch.nn.init's functions no-ops. On meta tensors they compute nothing, but the first one in a
    process loads torch's Python decompositions, about 2 s here (raylm draws every weight itself: init_param)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # the tensor it would fill, untouched
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_modules() -> Iterator[None]:
    """Build modules on the meta device: shapes only, no memory, and torch.nn.init skipped."""
    with torch.device("meta"), _SkipModuleInit():
        yield


def param_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Size]:
    """Every parameter's full shape by name, without allocating the weights."""
    with meta_modules():
        model = GPT(cfg, vocab_size)
    return {name: p.shape for name, p in model.named_parameters()}


def init_param(cfg: ModelConfig, shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """One parameter's fp32 starting value as a pure function of (config, seed, name): norms 1, matrices
    normal(0, std). Each parameter has its own generator, so any subset can be drawn in any order."""
    if len(shape) == 1:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    return torch.randn(shape, generator=gen) * _init_std(cfg, name)


def init_full_weights(cfg: ModelConfig, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter's starting value (init_param of each name): the whole model in memory at once."""
    return {name: init_param(cfg, shape, seed, name) for name, shape in param_shapes(cfg, vocab_size).items()}


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Trainable parameters, counting a tied embedding once."""
    return sum(math.prod(shape) for shape in param_shapes(cfg, vocab_size).values())
