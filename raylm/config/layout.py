"""The parallel layout's arithmetic and its checks in one place: the Layout dataclass, read from the config.

Like torchtitan's ParallelDims it owns the degrees, the world size, the replica size, the DP sizes an elastic
run may take and the checks on them, each with the fix. Rank coordinates and process groups are
raylm.parallel.topology's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raylm.config.derived import ffn_hidden, kv_heads, padded_vocab
from raylm.config.schema import Config, ModelConfig, ParallelConfig
from raylm.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """pp * cp * tp * dp ranks; `dp_min`..`dp_max` (0 when fixed) is the range an elastic run's dp moves in;
    `sequence_parallel` splits the activations between TP regions along the sequence over the tp ranks; `cp`
    context-parallel ranks of one replica each hold 1/cp of every window's positions (Ulysses)."""

    pp: int
    tp: int
    dp: int
    dp_min: int = 0
    dp_max: int = 0
    sequence_parallel: bool = False
    cp: int = 1

    @classmethod
    def of(cls, parallel: ParallelConfig) -> Layout:
        return cls(
            parallel.pp,
            parallel.tp,
            parallel.dp,
            parallel.dp_min,
            parallel.dp_max,
            parallel.sequence_parallel,
            parallel.cp,
        )

    @property
    def world_size(self) -> int:
        """Ranks (Ray Train workers) of one group: one per (pp, dp, cp, tp) coordinate."""
        return self.pp * self.cp * self.tp * self.dp

    @property
    def replica_size(self) -> int:
        """Workers of one DP replica (pp * cp * tp): an elastic group grows and shrinks by whole replicas."""
        return self.pp * self.cp * self.tp

    @property
    def product(self) -> str:
        """The world size as the error lines spell it: 'parallel.pp * tp * dp = 2 * 1 * 1' (cp named when > 1)."""
        if self.cp == 1:
            return f"parallel.pp * tp * dp = {self.pp} * {self.tp} * {self.dp}"
        return f"parallel.pp * cp * tp * dp = {self.pp} * {self.cp} * {self.tp} * {self.dp}"

    @property
    def elastic(self) -> bool:
        """True when the DP size may change during the run (parallel.dp: [min, max] with min < max)."""
        return 0 < self.dp_min < self.dp_max

    def dp_sizes(self) -> range:
        """Every DP size the run may train with: dp_min..dp_max when elastic, else dp alone."""
        return range(self.dp_min, self.dp_max + 1) if self.elastic else range(self.dp, self.dp + 1)

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: replica_size * dp_min and * dp_max, or world_size twice when fixed."""
        sizes = self.dp_sizes()
        return self.replica_size * sizes[0], self.replica_size * sizes[-1]

    def batch_quantum(self, micro_batch: int) -> int:
        """What every global batch must be a multiple of: micro_batch * dp for each dp the run may take."""
        return micro_batch * math.lcm(*self.dp_sizes())

    def check_started(self, world_size: int | None) -> None:
        """The layout against the number of ranks actually started (None: not known yet)."""
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"{self.product} = {self.world_size} ranks, but "
                f"{world_size} were started; start {self.world_size} workers or change the degrees so their "
                f"product is {world_size}"
            )

    def check_num_workers(self, num_workers: int) -> None:
        """parallel.num_workers (0: derived) must be the degrees' product."""
        world = self.world_size
        if num_workers and num_workers != world:
            raise ConfigError(
                f"{self.product} = {world} does not "
                f"match parallel.num_workers={num_workers}; change the degrees or set "
                f"parallel.num_workers={world}"
            )

    def dp_of_group(self, world_size: int) -> int:
        """The DP replicas an elastic worker group of `world_size` workers holds."""
        dp, extra = divmod(world_size, self.replica_size)
        if extra or dp not in self.dp_sizes():  # the scaling policy proposes only whole replicas in the range
            replica = "pp * tp" if self.cp == 1 else "pp * cp * tp"
            raise ConfigError(
                f"a worker group of {world_size} workers is not a whole number of DP replicas "
                f"of {replica} = {self.replica_size} workers within parallel.dp=[{self.dp_min}, "
                f"{self.dp_max}]"
            )
        return dp

    def check_model(self, model: ModelConfig, vocab_size: int, zero_stage: int, seq_len: int) -> None:
        """Raise ConfigError, with the arithmetic and the fix, when the model cannot be split over the layout.

        The one home of the model-split rules: `raylm config` (validate) and build_engine both call it.
        `vocab_size` is data.vocab_size, before padding; `seq_len` is data.seq_len."""
        self.check_sequence_parallel(seq_len)
        vocab = padded_vocab(vocab_size)
        if model.n_layer < self.pp:
            raise ConfigError(
                f"model.n_layer={model.n_layer} < parallel.pp={self.pp}: every pipeline stage "
                f"needs at least one block; lower parallel.pp or add layers"
            )
        splits = (
            (f"model.n_head={model.n_head}", model.n_head, "pick tp dividing n_head"),
            (f"model.n_kv_head={kv_heads(model)}", kv_heads(model), "pick tp dividing n_kv_head"),
            (
                f"FFN width {ffn_hidden(model)} (model.ffn_hidden)",
                ffn_hidden(model),
                f"set model.ffn_hidden to a multiple of {self.tp}",
            ),
            (f"vocab {vocab_size}, padded to {vocab},", vocab, f"pick tp dividing {vocab}"),
        )
        for what, size, fix in splits:
            if size % self.tp:
                raise ConfigError(f"{what} is not divisible by parallel.tp={self.tp}; {fix}")
        if self.pp > 1 and zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={zero_stage} with parallel.pp={self.pp}: DeepSpeed's "
                f"pipeline engine supports ZeRO 0 or 1 only; set parallel.zero_stage=1 (or "
                f"parallel.pp=1)"
            )
        self.check_context_parallel(model, seq_len)  # after the TP splits: it counts heads per TP rank

    def check_sequence_parallel(self, seq_len: int) -> None:
        """Sequence parallelism splits each window's positions over the TP ranks: it needs tp > 1 dividing them."""
        if not self.sequence_parallel:
            return
        if self.tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the activations between TP "
                "layers over the TP ranks); set parallel.tp to 2 or more, or parallel.sequence_parallel=false"
            )
        if seq_len % self.tp:
            raise ConfigError(
                f"data.seq_len={seq_len} is not divisible by parallel.tp={self.tp}, which "
                f"parallel.sequence_parallel=true splits each window's positions over; set data.seq_len to a "
                f"multiple of {self.tp}"
            )

    def check_context_parallel(self, model: ModelConfig, seq_len: int) -> None:
        """Ulysses (cp > 1): pp = 1, whole KV heads per context-parallel rank, and seq_len split into whole
        slices (of whole sequence-parallel shards)."""
        if self.cp == 1:
            return
        if self.pp > 1:
            raise ConfigError(
                f"parallel.cp={self.cp} with parallel.pp={self.pp}: DeepSpeed's pipeline engine has no sequence "
                f"axis (its grid is pipe x data x model) to reduce gradients and send activations over; set "
                f"parallel.pp=1 (or parallel.cp=1)"
            )
        kv, local_kv = kv_heads(model), kv_heads(model) // self.tp
        if local_kv % self.cp:
            raise ConfigError(
                f"model.n_kv_head={kv} / parallel.tp={self.tp} = {local_kv} KV heads per TP rank is not a "
                f"multiple of parallel.cp={self.cp}: Ulysses gives each context-parallel rank whole KV heads "
                f"(and their query heads); pick cp dividing {local_kv}, a smaller tp, or more KV heads"
            )
        shards = self.cp * (self.tp if self.sequence_parallel else 1)
        if seq_len % shards:
            split = "parallel.cp * tp" if self.sequence_parallel else "parallel.cp"
            raise ConfigError(
                f"data.seq_len={seq_len} is not divisible by {split} = {shards}, which each window's positions "
                f"are split over; set data.seq_len to a multiple of {shards}"
            )


def num_workers(cfg: Config) -> int:
    """Ray Train workers: one per (pp, dp, cp, tp) rank."""
    return Layout.of(cfg.parallel).world_size


def is_elastic(parallel: ParallelConfig) -> bool:
    return Layout.of(parallel).elastic


def dp_sizes(parallel: ParallelConfig) -> range:
    return Layout.of(parallel).dp_sizes()


def replica_workers(parallel: ParallelConfig) -> int:
    return Layout.of(parallel).replica_size


def worker_range(cfg: Config) -> tuple[int, int]:
    return Layout.of(cfg.parallel).worker_range()


def batch_quantum(parallel: ParallelConfig) -> int:
    return Layout.of(parallel).batch_quantum(parallel.micro_batch)
