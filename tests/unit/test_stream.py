"""Rank streams: determinism, disjoint complete DP coverage, resume, ramps, dp change, val isolation, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_data_support import prepared

from raylm.data.order import Mixture, permute
from raylm.data.shards import read_data_manifest
from raylm.data.stream import RankStream, peek, split_windows
from raylm.errors import DataError

pytestmark = pytest.mark.unit
SEQ = 16


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("stream"))


def take(stream, micro_batches):
    batches = list(itertools.islice(stream, micro_batches))
    stream.close()
    return batches


def rows(out, dp_rank, dp_size, count, start=0, seed=7, micro_batch=2):
    stream = RankStream(out, "train", SEQ, seed, dp_rank, dp_size, micro_batch, start_sample=start)
    return [
        tuple(r.tolist())
        for x, y in take(stream, count // micro_batch)
        for r in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
    ]


def test_permutation_is_a_bijection():
    for size in (1, 2, 3, 7, 100, 4097):
        assert sorted(permute(np.arange(size), size, key=5).tolist()) == list(range(size))
    assert permute(np.arange(50), 50, 1).tolist() != permute(np.arange(50), 50, 2).tolist()


def test_batches_are_shifted_windows_and_deterministic(out):
    a = take(RankStream(out, "train", SEQ, 7, 0, 1, 4), 6)
    b = take(RankStream(out, "train", SEQ, 7, 0, 1, 4), 6)
    for (x, y), (x2, y2) in zip(a, b, strict=False):
        assert x.shape == y.shape == (4, SEQ) and str(x.dtype) == "torch.int64"
        assert (x[:, 1:] == y[:, :-1]).all() and (x == x2).all() and (y == y2).all()
    assert rows(out, 0, 1, 8, seed=7) != rows(out, 0, 1, 8, seed=8)


def test_dp_ranks_are_disjoint_and_complete(out):
    whole = rows(out, 0, 1, 24)
    shares = [rows(out, r, 3, 8) for r in range(3)]
    assert [shares[g % 3][g // 3] for g in range(24)] == whole  # rank r holds exactly g = r mod 3


def test_full_epoch_covers_every_window_once(out):
    stream = RankStream(out, "train", SEQ, 3, 0, 1, 1, prefetch=0)
    windows = stream.order.sources[0].windows
    located = stream.order.locate(np.arange(2 * windows))
    assert sorted(s.window for s in located[:windows]) == list(range(windows))
    assert located[windows].epoch == 1 and [s.window for s in located[windows : 2 * windows]] != [
        s.window for s in located[:windows]
    ]


def test_resume_equals_tail_and_survives_dp_change(out):
    whole = rows(out, 0, 1, 32)
    assert rows(out, 0, 1, 12, start=20) == whole[20:]
    # the run trained offsets [0, 20) with dp=2, then resumes with dp=4: rank r continues at g = 20 + r + 4k
    for r in range(4):
        assert rows(out, r, 4, 2, start=20, micro_batch=1) == [whole[20 + r], whole[24 + r]]
    with pytest.raises(DataError, match="not a multiple of dp_size=4"):
        RankStream(out, "train", SEQ, 7, 0, 4, 1, start_sample=6)


def test_offset_and_batch_ramp(out):
    stream = RankStream(out, "train", SEQ, 7, 1, 2, 2, start_sample=8)
    take(stream, 3)
    assert stream.global_offset == 8 + 3 * 2 * 2 and stream.state_dict()["global_offset"] == 20
    # a ramp only changes how many micro-batches make a step; the rank's sequence is the same
    assert rows(out, 1, 2, 6, micro_batch=2) == rows(out, 1, 2, 6, micro_batch=3)


def test_validation_stream_is_separate(out):
    train = RankStream(out, "train", SEQ, 7, 0, 1, 2)
    first = next(train)[0]
    val = take(RankStream(out, "val", SEQ, 7, 0, 1, 2), 2)
    assert take(RankStream(out, "val", SEQ, 7, 0, 1, 2), 2)[0][0].tolist() == val[0][0].tolist()
    second = next(train)[0]
    train.close()
    fresh = take(RankStream(out, "train", SEQ, 7, 0, 1, 2), 2)
    assert first.tolist() == fresh[0][0].tolist() and second.tolist() == fresh[1][0].tolist()


def test_mixture_weights_and_determinism(tmp_path, out):
    other = prepared(tmp_path / "b", docs=20)  # its own tokenizer, trained on other documents
    mixture = Mixture([1.0, 3.0], seed=0, names=["a", "b"])
    source, within = mixture.locate(np.arange(4096))
    assert np.bincount(source).tolist() == [1024, 3072]
    assert within[source == 1].tolist() == list(range(3072))
    with pytest.raises(DataError, match="another tokenizer"):
        RankStream([{"path": out, "weight": 1}, {"path": other, "weight": 3}], "train", SEQ, 0, 0, 1, 2)


def test_mixture_stream(tmp_path):
    a = prepared(tmp_path / "a")
    b = prepared(tmp_path / "b", f"data.tokenizer={a / 'tokenizer.json'}", docs=10)
    sources = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 1.0}]
    s1 = RankStream(sources, "train", SEQ, 0, 0, 1, 1, prefetch=0)
    located = s1.order.locate(np.arange(1024))
    assert sum(s.source for s in located) == 512
    assert (
        take(RankStream(sources, "train", SEQ, 0, 0, 1, 4), 3)[2][0].tolist()
        == take(RankStream(sources, "train", SEQ, 0, 0, 1, 4), 3)[2][0].tolist()
    )


def test_corruption_stops_the_stream(tmp_path):
    out = prepared(tmp_path)
    shard = out / read_data_manifest(out)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    stream = RankStream(out, "train", SEQ, 7, 0, 1, 64)
    with pytest.raises(DataError, match=shard.name):
        take(stream, 50)
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard.name} named in the manifest is missing"):
        RankStream(out, "train", SEQ, 7, 0, 1, 2)


def test_corpus_smaller_than_a_window(out):
    with pytest.raises(DataError, match="fewer than one window"):
        RankStream(out, "val", 100000, 7, 0, 1, 2)


def test_peek_matches_the_stream(out):
    lines = list(peek(out, dp_rank=1, dp_size=2, start=3, count=4, seed=7, seq_len=SEQ))
    assert [line["sample_id"] for line in lines] == [7, 9, 11, 13]
    full = rows(out, 1, 2, 8, micro_batch=1)
    assert [line["tokens"] for line in lines] == [list(r[:16]) for r in full[3:7]]
    assert isinstance(lines[0]["text"], str)


def test_samples_sha_names_exactly_the_samples_a_step_trains_on(out):
    """A step's samples_sha covers what every DP rank reads, whatever dp is; other samples or seeds differ."""
    from raylm.config import resolve
    from raylm.data.order import samples_sha
    from raylm.data.stream import run_order

    cfg = resolve({}, [f"data.out_dir={out}", "data.paths=[]", f"data.seq_len={SEQ}", "run.seed=7"])
    order = run_order(cfg)
    step = samples_sha(order, 8, 16)
    assert step == samples_sha(run_order(cfg), 8, 16)  # any process computes it alone
    assert step != samples_sha(order, 16, 24)
    assert step != samples_sha(
        run_order(resolve({}, [f"data.out_dir={out}", "data.paths=[]", f"data.seq_len={SEQ}", "run.seed=8"])),
        8,
        16,
    )
    one = rows(out, 0, 1, 8, start=8)
    two = [
        r
        for pair in zip(rows(out, 0, 2, 4, start=8), rows(out, 1, 2, 4, start=8), strict=False)
        for r in pair
    ]
    assert one == two  # dp=2 ranks together read exactly the dp=1 samples that the hash names


def test_document_boundaries_travel_with_each_window_and_resume_exactly(out):
    """data.document_mask: inputs become (tokens, doc ids, positions), a function of the tokens alone, so a
    stream resumed at sample 8 continues the uninterrupted one exactly, boundaries included."""
    whole = take(RankStream(out, "train", SEQ, 7, 0, 1, 2, documents="restart"), 8)
    resumed = take(RankStream(out, "train", SEQ, 7, 0, 1, 2, start_sample=8, documents="restart"), 4)
    plain = take(RankStream(out, "train", SEQ, 7, 0, 1, 2), 8)
    for ((tokens, doc_ids, positions), y), (x, y2) in zip(whole, plain, strict=True):
        assert (tokens == x).all() and (y == y2).all() and doc_ids.shape == positions.shape == x.shape
        ends = tokens == 0  # EOT
        assert (doc_ids[:, 1:] - doc_ids[:, :-1] == ends[:, :-1].long()).all()
        assert (positions[:, 1:][ends[:, :-1]] == 0).all()
    assert any((x == 0).any() for (x, _, _), _ in whole)  # the corpus's documents end inside windows
    for (a, _), (b, _) in zip(whole[4:], resumed, strict=True):
        assert all((ta == tb).all() for ta, tb in zip(a, b, strict=True))


def test_split_windows_cuts_each_sample_into_consecutive_windows():
    samples = np.arange(2 * 9).reshape(2, 9)  # two samples of T = 8 (+ 1 target)
    assert split_windows(samples, 4).tolist() == [
        [0, 1, 2, 3, 4],
        [4, 5, 6, 7, 8],
        [9, 10, 11, 12, 13],
        [13, 14, 15, 16, 17],
    ]
    assert split_windows(samples, 8).tolist() == samples.tolist()


@pytest.mark.parametrize("documents", ["", "restart"])
def test_a_shorter_window_reads_the_same_samples_and_resumes_at_any_length(out, documents):
    """schedule.seq_len: at window L each micro-batch holds the same samples' tokens as whole windows, cut into
    SEQ / L rows each (the same targets, the same count); the stream's state is the sample offset alone, so a
    stream resumed at sample 4 with the window of that step yields exactly what the uninterrupted one does."""

    def stream(start=0):
        return RankStream(out, "train", SEQ, 7, 0, 1, 2, start_sample=start, documents=documents)

    def tokens(x):
        return x[0] if documents else x

    whole = take(stream(), 4)
    cut = stream()
    cut.set_window(SEQ // 4)
    quartered = [next(cut) for _ in range(2)]
    cut.set_window(SEQ // 2)
    halved = [next(cut) for _ in range(2)]
    assert cut.state_dict()["global_offset"] == 8
    cut.close()
    for (x, y), (xs, ys), rows in zip(whole, [*quartered, *halved], [8, 8, 4, 4], strict=True):
        assert tokens(xs).shape == ys.shape == (rows, 2 * SEQ // rows)
        assert (tokens(xs).reshape(2, SEQ) == tokens(x)).all() and (ys.reshape(2, SEQ) == y).all()
        if documents:  # each row's boundaries and positions are its own
            assert (xs[1][:, 0] == 0).all() and (xs[2][:, 0] == 0).all()
    resumed = stream(start=4)  # where the halved windows began
    resumed.set_window(SEQ // 2)
    for (x, y), (x2, y2) in zip(take(resumed, 2), halved, strict=True):
        assert (y == y2).all() and all((a == b).all() for a, b in zip(x, x2, strict=True))
    with pytest.raises(DataError, match="does not divide data.seq_len=16"):
        stream().set_window(5)
