"""Pre-extraction: records the training engine reads, correct features, manifest, resume without redoing
work, refusal of a cache made with another configuration."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.data import extract as X
from neodragon_jax.data import synthetic as S
from neodragon_jax.data.video_folder import VideoFolder
from neodragon_jax.models.text.conditioner import TextConditioner
from neodragon_jax.models.text.tokenizers import TextTokenizers
from neodragon_jax.models.vae import CausalVideoVAE, normalize_latents
from train.data import DataIterator, NpzRecords

N_GOOD = 5


def random_model(ctor, seed):
    """``ctor()`` with numpy-drawn O(1) weights: no XLA compile per parameter (init_jit takes ~15 s here)."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(_, leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def cfg():
    base = load_config("tiny")
    vae = dataclasses.replace(base.model.vae, decoder="light", causal=dataclasses.replace(
        base.model.vae.causal, block_out_channels=(8, 8, 8, 8), norm_groups=2))
    return dataclasses.replace(base, model=dataclasses.replace(base.model, vae=vae),
                               video=dataclasses.replace(base.video, height=32, width=32, num_frames=9, fps=8))


@pytest.fixture(scope="module")
def models(cfg):
    vae = random_model(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0)), seed=1)
    text = random_model(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(0)), seed=2)
    return vae, text, TextTokenizers.for_config(cfg.model.text)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = S.write_dataset(tmp_path_factory.mktemp("extract_src"), N_GOOD, seed=3, height=32, width=32,
                           num_frames=9, fps=8, progress=False)
    (root / "videos/bad.mp4").write_bytes(b"\x00not a video" * 50)
    with open(root / "captions.jsonl", "a") as f:
        f.write(json.dumps({"video": "videos/bad.mp4", "text": "a broken file"}) + "\n")
        f.write(json.dumps({"video": "videos/gone.mp4", "text": "a missing file"}) + "\n")
    return root


def run(cfg, models, dataset, out, **kw):
    vae, text, tok = models
    return X.extract(VideoFolder.from_config(dataset, cfg), out, cfg, vae=vae, text=text, tokenizers=tok,
                     progress=False, **kw)


@pytest.fixture(scope="module")
def reference(cfg, models, dataset, tmp_path_factory):
    """One uninterrupted extraction."""
    out = tmp_path_factory.mktemp("cache_ref")
    return run(cfg, models, dataset, out, batch_size=2, seed=7)


def load_all(out):
    return {p.name: dict(np.load(p)) for p in sorted((out / X.RECORDS).glob("*.npz"))}


def test_records_are_what_the_training_engine_reads(reference, cfg):
    r = reference
    assert (r.total, r.done, r.processed, r.skipped) == (N_GOOD + 2, N_GOOD, N_GOOD, 2)
    records = NpzRecords(r.records_dir)
    assert len(records) == N_GOOD
    it = DataIterator(records, X.RECORD_KEYS, 2, seed=0, prefetch=0)
    batch = next(it)
    it.close()
    s = cfg.model.text.max_length
    assert batch["latents"].shape == (2, 16, 2, 4, 4) and batch["latents"].dtype == np.float32
    assert batch["text_tokens"].shape == (2, s, cfg.model.text.t5.d_model)
    assert batch["text_mask"].shape == (2, s) and batch["text_mask"].dtype == np.int32
    assert batch["pooled"].shape == (2, cfg.model.text.clip_l.projection_dim + cfg.model.text.clip_g.projection_dim)
    null = X.load_null_text(r.out_dir)
    assert null["null_text_tokens"].shape == (1, s, cfg.model.text.t5.d_model)
    assert null["null_text_mask"].sum() == 1  # the empty prompt is just the T5 EOS
    assert null["null_pooled"].shape == (1, batch["pooled"].shape[1])


def test_manifest(reference, dataset):
    m = X.load_manifest(reference.out_dir)
    assert m["count"] == N_GOOD and m["total"] == N_GOOD + 2 and len(m["config_hash"]) == 20
    assert m["stats"] == {"records": N_GOOD, "missing": 1, "corrupt": 1, "too_short": 0}
    rows = {r["source"]: r for r in m["records"]}
    assert rows["videos/000000.mp4"]["done"] and rows["videos/000000.mp4"]["record"] == "records/000000.npz"
    assert rows["videos/bad.mp4"]["skipped"].startswith("corrupt") and not rows["videos/bad.mp4"]["done"]
    assert rows["videos/gone.mp4"]["skipped"].startswith("missing")
    assert m["config"]["seed"] == 7 and m["config"]["video"]["height"] == 32


def test_features_equal_direct_encoding(reference, cfg, models, dataset):
    vae, text, tok = models
    item = VideoFolder.from_config(dataset, cfg)[3]
    rec = dict(np.load(reference.records_dir / "000003.npz"))
    key = jax.random.fold_in(jax.random.key(7), 3)
    sample = nnx.jit(lambda m, v, k: normalize_latents(m.sample(v, k), cfg.model.vae))
    z = sample(vae, jnp.asarray(item["video"])[None], key)[0]
    np.testing.assert_allclose(rec["latents"], np.asarray(z), rtol=1e-5, atol=1e-5)
    ids = tok([item["text"]])
    encode = nnx.jit(lambda m, *a: m(*a))
    tokens, mask, pooled = encode(text, *(jnp.asarray(a) for a in (ids.t5_ids, ids.t5_mask, ids.clip_l_ids,
                                                                   ids.clip_g_ids)))
    np.testing.assert_allclose(rec["text_tokens"], np.asarray(tokens[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rec["text_mask"], np.asarray(mask[0]))
    np.testing.assert_allclose(rec["pooled"], np.asarray(pooled[0]), rtol=1e-5, atol=1e-5)
    # Posterior samples differ per record (keys by entry index), not only by content.
    assert not np.allclose(rec["latents"], np.load(reference.records_dir / "000002.npz")["latents"])


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_does_only_the_rest(reference, cfg, models, dataset, tmp_path):
    out = tmp_path / "cache"
    k = 3
    seen = []

    def stop_after_k(index, record):
        seen.append(index)
        assert set(record) == set(X.RECORD_KEYS)
        if len(seen) == k:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(cfg, models, dataset, out, batch_size=2, seed=7, on_record=stop_after_k)
    assert X.load_manifest(out)["count"] == k  # flushed on the way out
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / X.RECORDS).glob("*.npz")}
    assert len(mtimes) == k

    second = []
    r = run(cfg, models, dataset, out, batch_size=2, seed=7, on_record=lambda i, _: second.append(i))
    assert r.processed == N_GOOD - k and sorted(second + seen) == list(range(N_GOOD))
    assert {p.name: p.stat().st_mtime_ns for p in (out / X.RECORDS).glob("*.npz") if p.name in mtimes} == mtimes
    assert r.done == N_GOOD and r.skipped == 2
    ref, got = load_all(reference.out_dir), load_all(out)
    assert ref.keys() == got.keys()
    for name in ref:
        for key in X.RECORD_KEYS:
            np.testing.assert_allclose(got[name][key], ref[name][key], rtol=1e-6, atol=1e-6)
    strip = lambda m: {k: v for k, v in m.items() if k != "source"}  # noqa: E731
    assert strip(X.load_manifest(out)) == strip(X.load_manifest(reference.out_dir))
    # A third run has nothing left to do.
    assert run(cfg, models, dataset, out, batch_size=2, seed=7).processed == 0


def test_another_configuration_is_refused_unless_overwritten(reference, cfg, models, dataset, tmp_path):
    out = tmp_path / "cache"
    vae, text, tok = models
    folder = VideoFolder.from_config(dataset, cfg)
    X.extract(folder, out, cfg, vae=vae, text=text, tokenizers=tok, seed=7, progress=False)
    with pytest.raises(X.CacheMismatchError, match=r"differs in: seed\)"):
        X.extract(folder, out, cfg, vae=vae, text=text, tokenizers=tok, seed=8, progress=False)
    other_vae = random_model(lambda: CausalVideoVAE(cfg.model.vae, rngs=nnx.Rngs(0)), seed=5)
    with pytest.raises(X.CacheMismatchError, match=r"vae_weights"):
        X.extract(folder, out, cfg, vae=other_vae, text=text, tokenizers=tok, seed=7, progress=False)
    r = X.extract(folder, out, cfg, vae=vae, text=text, tokenizers=tok, seed=8, overwrite=True, progress=False,
                  null_in_records=True)
    assert r.processed == N_GOOD and X.load_manifest(out)["config"]["seed"] == 8
    rec, null = dict(np.load(r.records_dir / "000001.npz")), X.load_null_text(out)
    assert set(rec) == set(X.RECORD_KEYS) | set(X.NULL_KEYS)
    for k in X.NULL_KEYS:
        np.testing.assert_array_equal(rec[k], null[k][0])
    with pytest.raises(ValueError, match="batch_size"):
        X.extract(folder, out, cfg, vae=vae, text=text, tokenizers=tok, batch_size=0)
