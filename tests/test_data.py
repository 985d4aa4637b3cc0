"""The data loader: audio reading, size batching, crop/pad collation, determinism, sharding, resume."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from d2vcli.data import (
    AudioDataset,
    BatchLoader,
    DataPosition,
    batch_rng,
    collate_pad,
    epoch_batches,
    load_audio,
)
from d2vcli.manifest import Record
from d2vcli.vocab import PAD, Vocab

LENGTHS = [9000, 12000, 12000, 15000, 20000, 20000, 20000, 24000, 30000, 33000, 41000, 47000, 3000]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """13 short mono FLAC files with distinct content (the last one shorter than min_sample_size)."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(LENGTHS):
        path = root / f"u{i}.flac"
        sf.write(path, (0.3 * rng.standard_normal(n) + 0.05 * i).clip(-1, 1), 16000, subtype="PCM_16")
        out.append(Record(id=f"u{i}", path=str(path), num_samples=n, text="AB BA" if i % 2 else "A B"))
    return out


def test_load_audio_normalizes_the_whole_utterance_and_reads_segments(records, tmp_path):
    r = records[4]
    raw = load_audio(r, normalize=False)
    ref, _ = sf.read(r.path, dtype="float32")
    np.testing.assert_array_equal(raw, ref)
    norm = load_audio(r, normalize=True)
    expect = (ref.astype(np.float64) - ref.mean()) / np.sqrt(ref.var() + 1e-5)  # F.layer_norm semantics
    np.testing.assert_allclose(norm, expect, atol=1e-5)
    # A segment of a longer file (Libri-light VAD): offset/num_samples pick exactly that slice,
    # and normalization covers the segment only.
    seg = Record(id="seg", path=r.path, num_samples=5000, offset=1234)
    np.testing.assert_array_equal(load_audio(seg, normalize=False), ref[1234:6234])
    # Stereo is averaged to mono.
    stereo = tmp_path / "st.wav"
    sf.write(stereo, np.stack([ref, np.zeros_like(ref)], axis=1), 16000, subtype="FLOAT")
    mono = load_audio(Record(id="st", path=str(stereo), num_samples=len(ref)), normalize=False)
    np.testing.assert_allclose(mono, ref / 2, atol=1e-6)


def test_bad_audio_errors_name_the_file_and_the_fix(records, tmp_path):
    wrong_sr = tmp_path / "8k.wav"
    sf.write(wrong_sr, np.zeros(800, dtype=np.float32), 8000)
    with pytest.raises(ValueError, match=r"8k\.wav.*8000 Hz.*16000"):
        load_audio(Record(id="x", path=str(wrong_sr), num_samples=800), normalize=False)
    stale = Record(id="u0", path=records[0].path, num_samples=LENGTHS[0] + 500)
    with pytest.raises(ValueError, match="stale.*d2v prepare"):
        load_audio(stale, normalize=False)


def test_short_utterances_are_skipped_and_labels_encoded(records):
    vocab = Vocab(symbols=("|", "A", "B"))
    ds = AudioDataset(records, normalize=True, min_sample_size=8000, vocab=vocab)
    assert len(ds) == len(records) - 1 and ds.skipped == 1
    assert "u12" not in [r.id for r in ds.records]
    assert ds.labels[1] == vocab.encode("AB BA")
    bad = [Record(id="q", path=records[0].path, num_samples=LENGTHS[0], text="A Q")]
    with pytest.raises(ValueError, match="utterance q.*dict.ltr.txt"):
        AudioDataset(bad, normalize=False, vocab=vocab)


def test_batches_pack_by_size_and_are_a_function_of_seed_and_epoch():
    sizes = np.array([5, 9, 9, 9, 9, 3, 7, 7, 1, 10])
    b1 = epoch_batches(sizes, max_tokens=20, seed=3, epoch=1, shuffle=True)
    assert sorted(np.concatenate(b1).tolist()) == list(range(len(sizes)))  # every item exactly once
    for b in b1:
        assert len(b) * sizes[b].max() <= 20  # cost = batch size x longest
        assert list(sizes[b]) == sorted(sizes[b], reverse=True)  # filled longest first
    same = epoch_batches(sizes, max_tokens=20, seed=3, epoch=1, shuffle=True)
    assert [b.tolist() for b in b1] == [b.tolist() for b in same]
    others = {str([b.tolist() for b in epoch_batches(sizes, 20, seed=3, epoch=e, shuffle=True)]) for e in range(2, 8)}
    assert len(others) > 1, "the batch order (and ties) must change with the epoch"
    # Without shuffling (evaluation): longest first, stable.
    ordered = epoch_batches(sizes, max_tokens=20, seed=0, epoch=1, shuffle=False)
    assert np.concatenate(ordered).tolist() == np.argsort(-sizes, kind="stable").tolist()


def _loader(records, **kw):
    ds = AudioDataset(records, normalize=True, min_sample_size=8000)
    args = dict(max_tokens=60000, seed=7, max_sample_size=25000)
    args.update(kw)
    return BatchLoader(ds, "crop", **args)


def _epoch(loader):
    return [(b.epoch, b.index, b.ids, b.source) for b in loader]


def test_crop_collate_crops_to_the_shortest_at_random_offsets(records):
    loader = _loader(records)
    by_id = {r.id: load_audio(r, normalize=True) for r in records}
    seen_offsets = set()
    for b in loader:
        lengths = [len(by_id[i]) for i in b.ids]
        assert b.padding_mask is None
        assert b.source.shape == (len(lengths), min(min(lengths), 25000))  # no padding, capped
        assert b.source.shape[0] * b.source.shape[1] <= 60000
        for row, uid in zip(b.source.numpy(), b.ids):
            full = by_id[uid]
            starts = [s for s in range(len(full) - len(row) + 1) if np.array_equal(full[s:s + len(row)], row)]
            assert starts, "each row is a contiguous slice of its utterance"
            seen_offsets.add(starts[0])
        assert b.num_samples == b.source.numel()
    assert len(seen_offsets) > 3, "offsets are random, not always 0"


def test_pad_collate_zero_pads_and_returns_mask_and_labels(records):
    vocab = Vocab(symbols=("|", "A", "B"))
    ds = AudioDataset(records[:3], normalize=False, vocab=vocab)
    batch = collate_pad([ds[0], ds[1], ds[2]])
    src, mask = batch.source, batch.padding_mask
    assert src.shape == (3, 12000) and mask.dtype == torch.bool
    assert mask[0, 9000:].all() and not mask[0, :9000].any() and not mask[1].any()
    assert (src[0, 9000:] == 0).all()
    assert batch.num_samples == 9000 + 12000 + 12000
    assert batch.target_lengths.tolist() == [len(vocab.encode("A B")), len(vocab.encode("AB BA")),
                                                len(vocab.encode("A B"))]
    assert batch.target[0, batch.target_lengths[0]:].eq(PAD).all()
    assert batch.target[1].tolist() == vocab.encode("AB BA")


def test_loader_is_deterministic_and_workers_do_not_change_batches(records):
    a = _epoch(_loader(records))
    b = _epoch(_loader(records, num_workers=2))
    assert [x[:3] for x in a] == [x[:3] for x in b]
    assert all(torch.equal(x[3], y[3]) for x, y in zip(a, b))
    other_seed = _epoch(_loader(records, seed=8))
    assert [x[2] for x in a] != [x[2] for x in other_seed]
    # The per-batch RNG depends only on (seed, epoch, index, stream).
    assert batch_rng(7, 1, 3, 0).integers(1 << 30) == batch_rng(7, 1, 3, 0).integers(1 << 30)
    assert batch_rng(7, 1, 3, 0).integers(1 << 30) != batch_rng(7, 1, 3, 1).integers(1 << 30)


def test_position_restores_mid_epoch_and_rolls_over(records):
    straight = _loader(records)
    epoch1 = _epoch(straight)
    assert straight.position == DataPosition(2, 0)
    epoch2 = _epoch(straight)
    assert [x[2] for x in epoch2] != [x[2] for x in epoch1]

    first = _loader(records)
    it = iter(first)
    for _ in range(3):
        next(it)
    saved = first.state_dict()
    assert saved == {"epoch": 1, "consumed": 3}
    resumed = _loader(records)
    resumed.load_state_dict(saved)
    rest = _epoch(resumed)
    assert [x[1] for x in rest] == [x[1] for x in epoch1[3:]]
    assert all(torch.equal(x[3], y[3]) for x, y in zip(rest, epoch1[3:]))  # same crops too
    assert [x[2] for x in _epoch(resumed)] == [x[2] for x in epoch2]


def test_sharding_splits_global_batches_between_ranks(records):
    single = _epoch(_loader(records))
    n = len(single)
    ranks = [_loader(records, rank=r, world_size=2) for r in range(2)]
    shards = [_epoch(loader) for loader in ranks]
    assert len(shards[0]) == len(shards[1]) == n // 2  # equal step counts: the uneven tail is dropped
    assert [x[1] for x in shards[0]] == list(range(0, 2 * (n // 2), 2))
    assert [x[1] for x in shards[1]] == list(range(1, 2 * (n // 2), 2))
    for shard in shards:  # a rank's batch is the same batch (ids and crop) as in a single process
        for x in shard:
            assert x[2] == single[x[1]][2] and torch.equal(x[3], single[x[1]][3])
    # Position is global: after one batch per rank, both say 2 consumed, and a 1-process
    # resume from there continues with global batch 2.
    ranks = [_loader(records, rank=r, world_size=2) for r in range(2)]
    its = [iter(loader) for loader in ranks]
    for it in its:
        next(it)
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": 1, "consumed": 2}
    one = _loader(records)
    one.load_state_dict(ranks[0].state_dict())
    assert next(iter(one)).index == 2
    # Evaluation keeps every batch.
    kept = [_epoch(_loader(records, rank=r, world_size=2, drop_uneven=False)) for r in range(2)]
    assert sorted(x[1] for s in kept for x in s) == list(range(n))
