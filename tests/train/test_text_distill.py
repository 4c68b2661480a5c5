"""text-distill: the loss by hand and without padded tokens, every mode trains (roles per mode), frozen roles
stay put and stay out of checkpoints, the sharded step equals the one-device step, the target cache resumes
and feeds the same step as online targets, every mode's Neodragon form computes the student's tokens, the
teacher's CE loads alone from an official MMDiT file, and release: sources."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.data.prompts import write_corpus
from neodragon_jax.sharding import activate, make_mesh
from train.checkpoint import flat_shapes
from train.roles import Models
from train.state import build_setup
from train.step import make_train_step
from train.text_distill import (
    CacheError,
    TextDistill,
    build_target_cache,
    distill_loss,
    neodragon_form,
    teacher_function,
    with_settings,
)

PROMPTS = [f"a {c} {s} moving {d} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square")
           for d in ("left", "right", "up") for b in ("black", "white")]
HELDOUT = ["a cyan diamond moving down on a gray background", "a yellow triangle resting on a black background"]
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, PROMPTS, HELDOUT, {"kind": "test"})
    return d


def _cfg(corpus, *extra, mode="replace"):
    return load_config("tiny", [
        "train.stage=text-distill", "train.global_batch=8", "train.steps=20", "train.log_every=1",
        "train.tensorboard=false", "train.peak_flops=1e9", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.lr=1e-2", "model.text.max_length=12", "model.text.t5.num_layers=1",
        "model.text.distil_t5.body.num_layers=1", f'data.path="{corpus}"', "stages.text-distill.teacher_init=random",
        f"stages.text-distill.mode={mode}", "stages.text-distill.cache_chunk=8", *extra])


def _batch(stage, cfg, rows):
    ex = [stage.make_example(cfg, i) for i in rows]
    return {k: np.stack([e[k] for e in ex]) for k in ex[0]}


def _mesh(shape):
    n = shape["data"] * shape["fsdp"] * shape["tensor"]
    return make_mesh(shape, devices=jax.devices()[:n])


# ------------------------------------------------------------------------------------------------ loss
def test_loss_on_a_hand_computed_example():
    pred = jnp.asarray([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]]])
    target = jnp.asarray([[[3.0, 4.0], [0.0, 1.0], [-5.0, 7.0]]])
    mask = jnp.asarray([[1, 1, 0]])
    # token 0: error 0, cos 1; token 1: per-element MSE (1 + 1) / 2 = 1, cos 0; token 2 is padding.
    loss, m = distill_loss(pred, target, mask, 1.0, 0.1)
    assert float(m["mse"]) == pytest.approx(0.5)
    assert float(m["cos"]) == pytest.approx(0.5)
    assert float(m["cos_dist"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(0.5 + 0.1 * 0.5)
    assert float(distill_loss(pred, target, mask, 2.0, 0.0)[0]) == pytest.approx(1.0)


def test_padded_tokens_change_neither_loss_nor_gradient():
    k1, k2 = jax.random.split(jax.random.key(0))
    pred, target = jax.random.normal(k1, (2, 5, 4)), jax.random.normal(k2, (2, 5, 4))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    pad = (mask == 0)[..., None]
    wild_p = jnp.where(pad, jnp.inf, pred)
    wild_t = jnp.where(pad, 1e6, target)
    f = lambda p, t: distill_loss(p, t, mask, 1.0, 0.1)[0]  # noqa: E731
    assert float(f(wild_p, wild_t)) == pytest.approx(float(f(pred, target)), rel=1e-6)
    g = jax.grad(f)(pred, target)
    assert np.all(np.asarray(g)[np.asarray(pad[..., 0])] == 0)
    assert np.allclose(np.asarray(jax.grad(f)(wild_p, wild_t)), np.asarray(g))
    # Only the valid tokens' count normalises: one more padded token changes nothing.
    assert float(f(pred, target)) == pytest.approx(float(distill_loss(pred[:, :4], target[:, :4], mask[:, :4], 1.0,
                                                                      0.1)[0]), rel=1e-6)


# ----------------------------------------------------------------------------------------------- modes
ROLES = {
    "replace": ({"adapter"}, {"t5", "embedder", "dt5"}),
    "extend": ({"adapter"}, {"t5", "embedder", "dt5"}),
    "lora": ({"lora"}, {"t5", "embedder", "dt5"}),
    "train-dt5": ({"dt5", "adapter"}, {"t5", "embedder"}),
    "pretrain-dt5": ({"dt5"}, {"t5"}),
}


@pytest.mark.parametrize("mode", list(ROLES))
def test_each_mode_trains(corpus, mode):
    cfg = _cfg(corpus, mode=mode)
    stage = TextDistill(cfg)
    mesh = _mesh(ONE)
    setup = build_setup(stage, cfg, mesh)
    assert (set(setup.trainable), set(setup.frozen)) == ROLES[mode]
    state, frozen = setup.init_state(), setup.init_frozen()
    batch = _batch(stage, cfg, range(8))
    step = jax.jit(make_train_step(setup), donate_argnums=0)
    losses = []
    with activate(mesh, setup.rules):
        for _ in range(10):
            state, m = step(state, frozen, batch)
            losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses


def test_extend_adapter_maps_t5_width_and_widths_are_checked(corpus):
    cfg = _cfg(corpus, "model.text.t5.d_model=48", "model.text.distil_t5.projection_dim=40",
               "model.text.context_adapter.in_dim=40", "model.mmdit.context_in_dim=48", mode="extend")
    setup = build_setup(TextDistill(cfg), cfg, _mesh(ONE))
    assert setup.plan.configs["adapter"].model.text.context_adapter.out_dim == 48  # CA maps into the CE's input
    with pytest.raises(ValueError, match="projection_dim=40 must equal model.text.t5.d_model=48"):
        TextDistill(with_settings(cfg, mode="lora"))
    with pytest.raises(ValueError, match="context_in_dim=64 but the teacher T5 is 48 wide"):
        TextDistill(load_config("tiny", ["model.text.t5.d_model=48"]))


def test_role_states_hold_no_rng_keys_so_plans_can_size_them(corpus):
    from neodragon_jax.sharding.checks import sharding_report

    for mode in ("replace", "train-dt5"):  # DT5 frozen, then trained: its head dropout must carry no RNG stream
        cfg = _cfg(corpus, mode=mode)
        setup = build_setup(TextDistill(cfg), cfg, _mesh(ONE))
        for tree in (setup.abstract_frozen, setup.abstract_state["params"], setup.abstract_state["model_state"]):
            assert not [x for x in jax.tree.leaves(tree) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
        assert sharding_report(setup.abstract_frozen).device_bytes > 0


# ----------------------------------------------------------------------------------- frozen, sharded
def test_frozen_roles_absent_from_checkpoints(corpus, tmp_path):
    from train.loop import run
    from train.weights import run_state

    cfg = _cfg(corpus, "train.steps=2", "checkpoint.every_steps=2", f'train.output_dir="{tmp_path}"',
               'mesh.rules="fsdp"', "mesh.data=2", "mesh.fsdp=4")
    result = run(cfg, stage=TextDistill(cfg), mesh=make_mesh(cfg.mesh), console=False)
    assert result.end_step == 2 and np.isfinite(result.last_metrics["loss"])
    step_saved, saved = run_state(tmp_path)
    assert step_saved == 2
    roles = {k.split("/")[1] for k in flat_shapes(saved) if k.startswith(("params/", "opt_state/", "ema/"))}
    assert roles == {"adapter"}, roles
    assert json.loads((tmp_path / "config.json").read_text())["stages"]["text-distill"]["mode"] == "replace"


def test_sharded_step_equals_single_device_step_and_leaves_frozen_roles(corpus):
    from train.step import batch_sharding_tree, jit_train_step

    cfg = _cfg(corpus, mode="train-dt5")
    stage = TextDistill(cfg)
    host_batch = _batch(stage, cfg, range(8))
    out = {}
    for name, shape in (("one", ONE), ("eight", EIGHT)):
        c = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules="fsdp", **shape))
        mesh = _mesh(shape)
        setup = build_setup(stage, c, mesh)
        state, frozen = setup.init_state(), setup.init_frozen()
        before = jax.device_get({n: f["params"] for n, f in frozen.items()})
        _, sh = batch_sharding_tree(setup)
        batch = {k: jax.device_put(v, sh[k]) for k, v in host_batch.items()}
        with activate(mesh, setup.rules):
            new, m = jit_train_step(setup)(state, frozen, batch)  # the state is donated, the frozen roles are not
        # The frozen roles are still alive (not donated) and unchanged.
        jax.tree.map(np.testing.assert_array_equal, before, jax.device_get({n: f["params"] for n, f in frozen.items()}))
        out[name] = (jax.device_get(new["params"]), float(m["loss"]))
    assert set(out["one"][0]) == {"dt5", "adapter"}
    assert out["one"][1] == pytest.approx(out["eight"][1], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out["one"][0], out["eight"][0])


# ------------------------------------------------------------------------------------------------ cache
def test_target_cache_resumes_and_feeds_the_same_step(corpus, tmp_path):
    cfg = _cfg(corpus, "stages.text-distill.targets=cache", f'stages.text-distill.cache_dir="{tmp_path / "c"}"',
               "stages.text-distill.cache_dtype=float32")
    stage = TextDistill(cfg)
    teacher, _ = teacher_function(cfg, _mesh(ONE))
    calls = []

    def counted(ids, mask):
        calls.append(1)
        return teacher(ids, mask)

    partial = build_target_cache(stage, cfg, max_chunks=2, teacher=counted, say=lambda s: None)
    rows = len(PROMPTS) + 1  # the training prompts and the negative prompt
    assert partial.num_chunks == -(-rows // 8) and partial.done == [0, 1] and not partial.complete
    full = build_target_cache(stage, cfg, teacher=counted, say=lambda s: None)  # resumes: the other chunks only
    assert full.complete and len(calls) == full.num_chunks
    again = build_target_cache(stage, cfg, teacher=counted, say=lambda s: None)  # complete: nothing to extract
    assert again.complete and len(calls) == full.num_chunks

    data = stage.prompt_data(cfg)
    online = np.asarray(teacher(data.ids[:8], data.mask[:8]))
    cached = np.stack([full.row(r) for r in range(8)])
    valid = data.mask[:8] != 0
    np.testing.assert_allclose(cached[valid], online[valid], rtol=1e-5, atol=1e-6)
    assert np.all(cached[~valid] == 0)

    # The same step from cached targets (no t5 role at all) and from online targets.
    losses = {}
    for targets in ("cache", "online"):
        c = with_settings(cfg, targets=targets)
        st = TextDistill(c)
        setup = build_setup(st, c, _mesh(ONE))
        assert ("t5" in setup.frozen) == (targets == "online")
        batch = _batch(st, c, range(8))
        with activate(setup.mesh, setup.rules):
            _, m = jax.jit(make_train_step(setup))(setup.init_state(), setup.init_frozen(), batch)
        losses[targets] = float(m["loss"])
    assert losses["cache"] == pytest.approx(losses["online"], rel=1e-5)

    # A cache made for other settings is refused, naming what differs.
    with pytest.raises(CacheError, match="max_length"):
        build_target_cache(TextDistill(other := _cfg(corpus, "model.text.max_length=10",
                                                     "stages.text-distill.targets=cache",
                                                     f'stages.text-distill.cache_dir="{tmp_path / "c"}"',
                                                     "stages.text-distill.cache_dtype=float32")), other,
                           say=lambda s: None)


# ----------------------------------------------------------------------------------- Neodragon form
@pytest.mark.parametrize("mode", ["extend", "lora"])
def test_neodragon_form_computes_the_students_tokens(corpus, mode):
    from flax import nnx

    cfg = _cfg(corpus, mode=mode)
    stage = TextDistill(cfg)
    setup = build_setup(stage, cfg, _mesh(ONE))
    state, frozen = setup.init_state(), setup.init_frozen()
    models = {**setup.frozen_modules(frozen), **setup.modules(state["params"], state["model_state"])}
    if mode == "lora":  # B starts at zero: give the factors values so that the merge matters
        for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(models["lora"], nnx.Param))):
            v.set_value(0.1 * jax.random.normal(jax.random.key(i), v.get_value().shape))
    batch = _batch(stage, cfg, range(4))
    want = stage.student_tokens(Models(models), batch["ids"], batch["mask"])
    dt5, ca, neo = neodragon_form(stage, models, cfg)
    assert neo.kind == "neodragon" and ca.cfg.out_dim == cfg.model.mmdit.hidden_size
    got = ca(dt5(batch["ids"], batch["mask"]))
    valid = batch["mask"] != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- weight sources
def test_context_embedder_loads_alone_from_an_official_mmdit_file_and_release_sources(tmp_path, monkeypatch):
    from neodragon_jax.convert.io import write_safetensors
    from neodragon_jax.models.text.context_embedder import ContextEmbedder
    from neodragon_jax.releases import file_digest
    from train.weights import WeightSourceError, load_weights, parse_source

    from flax import nnx

    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    b = np.arange(6, dtype=np.float32)
    folder = tmp_path / "rel" / "tiny-x"
    write_safetensors({"context_embedder.weight": w, "context_embedder.bias": b,
                       "proj_out.weight": np.zeros((3, 6), np.float32)},
                      folder / "diffusion_transformer_320p" / "diffusion_pytorch_model.safetensors")
    ce = nnx.eval_shape(lambda: ContextEmbedder(4, 6, rngs=nnx.Rngs(0)))
    flat = load_weights("official:" + str(folder), ce)
    np.testing.assert_array_equal(flat["context_embedder.kernel"], w.T)
    np.testing.assert_array_equal(flat["context_embedder.bias"], b)

    rel = "diffusion_transformer_320p/diffusion_pytorch_model.safetensors"
    (folder / "release.json").write_text(json.dumps({"name": "tiny-x", "preset": "tiny",
                                                     "files": {rel: file_digest(folder / rel)}}))
    monkeypatch.setattr("neodragon_jax.releases.RELEASES_DIR", tmp_path / "rel")
    assert str(parse_source("release:tiny-x")) == "release:tiny-x"
    np.testing.assert_array_equal(load_weights("release:tiny-x", ce)["context_embedder.kernel"], w.T)
    with pytest.raises(WeightSourceError, match="no release named 'nope'; shipped releases: tiny-x"):
        load_weights("release:nope", ce)
    with open(folder / rel, "ab") as f:  # a changed file no longer matches the record
        f.write(b"x")
    with pytest.raises(WeightSourceError, match="does not match its record"):
        load_weights("release:tiny-x", ce)
