"""Index-based input pipeline: determinism, epoch coverage, host slicing, JSON position, npz records."""

import json

import jax
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.sharding import batch_shardings, make_mesh
from train.data import DataIterator, IndexSampler, NpzRecords, SyntheticSource, to_global, write_npz_records
from train.stages import ToyStage


class _Counter:
    """Source whose example ``i`` is ``{"i": [i]}`` so batches reveal which records they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": np.array([i])}


def _take(it, k):
    return [next(it)["i"][:, 0].tolist() for _ in range(k)]


def test_each_epoch_is_a_fresh_permutation():
    s = IndexSampler(10, seed=3)
    e0, e1 = s.indices(0, 10), s.indices(10, 10)
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10))
    assert e0.tolist() != e1.tolist()
    assert s.indices(7, 6).tolist() == np.concatenate([e0[7:], e1[:3]]).tolist()
    assert IndexSampler(10, seed=3, shuffle=False).indices(8, 4).tolist() == [8, 9, 0, 1]


def test_resume_from_json_position_yields_the_same_batches():
    it = DataIterator(_Counter(13), ["i"], 4, seed=1)
    first = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    later = _take(it, 4)
    it2 = DataIterator(_Counter(13), ["i"], 4, seed=1)
    it2.set_state(state)
    assert _take(it2, 4) == later
    it3 = DataIterator(_Counter(13), ["i"], 4, seed=1, prefetch=0)
    assert _take(it3, 3) == first


def test_hosts_split_the_global_batch():
    whole = DataIterator(_Counter(50), ["i"], 8, seed=2, process_index=0, process_count=1)
    parts = [DataIterator(_Counter(50), ["i"], 8, seed=2, process_index=p, process_count=4) for p in range(4)]
    for _ in range(3):
        got = sum((next(p)["i"][:, 0].tolist() for p in parts), [])
        assert got == next(whole)["i"][:, 0].tolist()
    with pytest.raises(ValueError, match="must divide evenly over 3 hosts"):
        DataIterator(_Counter(50), ["i"], 8, process_index=0, process_count=3)


def test_npz_records_folder_and_file(tmp_path):
    examples = [{"latents": np.full((2, 3), i, np.float32), "text": np.full((4,), -i, np.float32)} for i in range(5)]
    folder = write_npz_records(tmp_path / "recs", examples)
    recs = NpzRecords(folder)
    assert len(recs) == 5 and recs[3]["latents"][0, 0] == 3
    np.savez(tmp_path / "all.npz", latents=np.stack([e["latents"] for e in examples]),
             text=np.stack([e["text"] for e in examples]))
    packed = NpzRecords(tmp_path / "all.npz")
    assert len(packed) == 5 and packed[4]["text"][0] == -4
    it = DataIterator(recs, ["latents", "missing"], 2, prefetch=0)
    with pytest.raises(KeyError, match=r"lack the fields \['missing'\]"):
        next(it)


def test_npz_records_in_memory_equal_the_files(tmp_path):
    # Captions of different lengths (<U5, <U11) are one layout: a string field's width is per record.
    examples = [{"latents": np.random.default_rng(i).normal(size=(2, 3)).astype(np.float32),
                 "mask": np.arange(4, dtype=np.int32) + i, "caption": np.asarray("a red" + " ball" * (i % 3))}
                for i in range(7)]
    folder = write_npz_records(tmp_path / "recs", examples)
    on_disk, in_memory = NpzRecords(folder), NpzRecords(folder, in_memory=True)
    assert in_memory.files is None and len(in_memory) == 7
    for i in range(7):
        for k in ("latents", "mask", "caption"):
            assert in_memory[i][k].dtype == on_disk[i][k].dtype
            np.testing.assert_array_equal(in_memory[i][k], on_disk[i][k])
    batches = [next(DataIterator(src, ["latents", "mask"], 4, seed=3, prefetch=0)) for src in (on_disk, in_memory)]
    for k in ("latents", "mask"):
        np.testing.assert_array_equal(batches[0][k], batches[1][k])
    np.savez(folder / "000007.npz", latents=np.zeros((2, 4), np.float32), mask=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="000007.npz: fields .* differ .* data.in_memory"):
        NpzRecords(folder, in_memory=True)


def test_global_batch_assembly_is_sharded():
    cfg = load_config("tiny")
    stage = ToyStage(cfg)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    example = stage.example_batch(cfg, 8)
    sh = batch_shardings(example, stage.batch_logical_axes(cfg), "fsdp", mesh)
    it = DataIterator(SyntheticSource(stage, cfg), ["x", "y"], 8, prefetch=0)
    local = next(it)
    batch = to_global(local, sh, 8)
    assert batch["x"].shape == (8, stage.seq, stage.dim)
    assert len(batch["x"].sharding.device_set) == 8 and batch["x"].sharding.shard_shape(batch["x"].shape)[0] == 1
    np.testing.assert_array_equal(jax.device_get(batch["y"]), local["y"])


def test_grain_pipeline_resumed_mid_epoch_gives_the_same_batches():
    """The position saved after 2 batches of a 13-record epoch (through the JSON the checkpoint stores)
    resumes, in a fresh iterator with its own prefetch threads, on exactly the batches an uninterrupted run
    reads next, across the epoch boundary; each of 2 hosts reads its half of them."""
    whole = DataIterator(_Counter(13), ["i"], 4, seed=5)
    _take(whole, 2)
    state = json.loads(json.dumps(whole.get_state()))
    assert state["samples_seen"] == 8 and state["grain"] == {"next_index": 2}
    uninterrupted = _take(whole, 5)
    resumed = DataIterator(_Counter(13), ["i"], 4, seed=5)
    resumed.set_state(state)
    assert _take(resumed, 5) == uninterrupted
    hosts = [DataIterator(_Counter(13), ["i"], 4, seed=5, process_index=p, process_count=2) for p in range(2)]
    for h in hosts:
        h.set_state(state)
    assert [a + b for a, b in zip(_take(hosts[0], 5), _take(hosts[1], 5))] == uninterrupted
    # A position written before the grain pipeline (samples_seen only) is the same position.
    old = DataIterator(_Counter(13), ["i"], 4, seed=5)
    old.set_state({"samples_seen": 8, "seed": 5})
    assert _take(old, 5) == uninterrupted
    with pytest.raises(ValueError, match="batches of 4, this run reads batches of 8"):
        DataIterator(_Counter(13), ["i"], 8, seed=5).set_state(state)
    for it in [whole, resumed, old, *hosts]:
        it.close()


def test_prompt_corpus_and_video_clips_sources(tmp_path):
    from neodragon_jax.config import load_config
    from neodragon_jax.data.synthetic import write_dataset
    from train.data import PromptCorpus, VideoClips

    (tmp_path / "prompts.txt").write_text("a red circle\n\n a blue square \n")
    assert [PromptCorpus(tmp_path / "prompts.txt")[i]["text"].item() for i in range(2)] == ["a red circle",
                                                                                             "a blue square"]
    folder = write_dataset(tmp_path / "data", n=3, seed=0, num_frames=9, progress=False)
    (folder / "videos" / "000001.mp4").write_bytes(b"not a video")
    corpus = PromptCorpus(folder)
    batch = next(DataIterator(corpus, ["text"], 3, shuffle=False, prefetch=0))
    assert batch["text"].tolist() == corpus.texts
    clips = VideoClips(folder, load_config("tiny", ["video.num_frames=9"]))
    got = next(DataIterator(clips, ["video", "text"], 3, shuffle=False, prefetch=0))
    # The unreadable clip 1 is replaced by clip 2 (positions stay fixed) and counted as today.
    assert got["video"].shape == (3, 3, 9, 64, 64) and got["text"].tolist() == [corpus.texts[0], corpus.texts[2],
                                                                                 corpus.texts[2]]
    assert clips.stats.as_dict()["data/videos_corrupt"] >= 1
