"""The `flow` training stage: layouts, the switch-of-gradients, records, overfitting, frozen blocks, DMD plan.

Compiling an MMDiT train step costs ~10 s per (stage, unit) layout on this CPU, so the training tests use the
tiny preset with 1-2 blocks, one unit layout (`train.pyramid_units=[0]`) and a 1-device mesh.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neodragon_jax.config import load_config
from neodragon_jax.convert import write_safetensors
from neodragon_jax.convert.io import param_shapes
from neodragon_jax.convert.keymap import torch_shape
from neodragon_jax.convert.mmdit import mmdit_keymap
from neodragon_jax.models.mmdit import abstract_mmdit
from neodragon_jax.pyramid.loss import plan_loss_groups, pyramid_flow_matching_loss
from neodragon_jax.pyramid.scheduler import make_schedule
from neodragon_jax.sharding import make_mesh
from train.data import write_npz_records
from train.flow_matching import (
    FlowMatchingStage,
    extract_records,
    flow_geometry,
    group_variants,
    grouped_flow_matching_loss,
    switch_value_and_grad,
    synthetic_record,
    take_rows,
)
from train.checkpoint import Checkpointer
from train.loop import checkpoint_dir, run
from train.state import build_setup
from train.stages import get_stage


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _block(key: str) -> int | None:
    m = re.search(r"\['transformer_blocks'\]\[(\d+)\]", key)
    return int(m.group(1)) if m else None


def test_group_variants_are_exactly_what_plan_loss_groups_draws():
    sch = make_schedule(load_config("tiny").pyramid)
    variants = group_variants(8, 7, sch)
    assert len(variants) == 7  # one layout per finest-stage unit
    drawn = {plan_loss_groups(jax.random.key(k), batch_size=8, num_frames=7, schedule=sch) for k in range(40)}
    assert drawn <= set(variants) and len(drawn) == 7
    for groups in variants:
        assert [g.stage for g in groups] == [0, 1, 2]
        assert sorted(i for g in groups for i in g.indices) == list(range(8))
        assert [len(g.indices) for g in groups] == [2, 4, 2]  # stage ratios 1:2:1
        assert groups[0].unit == groups[1].unit == 6 - groups[2].unit  # complementary units
    assert [g[-1].unit for g in group_variants(8, 7, sch, (6, 0))] == [6, 0]
    with pytest.raises(ValueError, match="out of range"):
        group_variants(8, 7, sch, (7,))


def test_grouped_loss_is_pyramid_flow_matching_loss_with_shard_local_rows():
    """Same numbers as the loss module's driver; rows are taken by reshape + slice, not a gather."""
    sch = make_schedule(load_config("tiny").pyramid)
    x = jnp.arange(16 * 3.0).reshape(16, 3)
    for groups in group_variants(16, 3, sch):
        for g in groups:
            np.testing.assert_array_equal(take_rows(x, g.indices), x[np.asarray(g.indices)])
            jaxpr = str(jax.make_jaxpr(lambda a, g=g: take_rows(a, g.indices))(x))
            assert "gather" not in jaxpr
    np.testing.assert_array_equal(take_rows(x, (0, 5, 6)), x[np.asarray([0, 5, 6])])  # no period: a gather

    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((8, 4, 3, 8, 8), dtype=np.float32),
             "text_tokens": rng.standard_normal((8, 5, 6), dtype=np.float32),
             "text_mask": np.ones((8, 5), np.int32), "pooled": rng.standard_normal((8, 7), dtype=np.float32)}

    def model(clips, tokens, mask, pooled, t):  # cheap stand-in that depends on every input
        return 0.3 * clips[-1] + 1e-3 * t[:, None, None, None, None] + jnp.mean(pooled) + sum(jnp.mean(c) for c in clips)

    for groups in group_variants(8, 3, sch):
        want, aux = pyramid_flow_matching_loss(model, batch, jax.random.key(5), schedule=sch, groups=groups)
        got, metrics = grouped_flow_matching_loss(model, batch, jax.random.key(5), schedule=sch, groups=groups)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for k in ("loss/stage0", "loss/stage1", "loss/stage2"):
            np.testing.assert_allclose(metrics[k], aux[k], rtol=1e-6)


def test_geometry_of_presets_and_config_errors():
    g = flow_geometry(load_config("neodragon-320p"))
    assert g.latent_shape == (16, 7, 40, 64) and (g.text_len, g.text_dim, g.pooled_dim) == (128, 1536, 2048)
    assert flow_geometry(load_config("pyramid-flow-sd3-320p")).text_dim == 4096  # T5-XXL into the context embedder
    tiny = flow_geometry(load_config("tiny"))
    assert tiny.latent_shape == (16, 3, 8, 8)
    with pytest.raises(ValueError, match="1 \\+ 8k frames"):
        flow_geometry(load_config("tiny", ["video.num_frames=16"]))
    with pytest.raises(ValueError, match="text tokens are 64-d"):
        flow_geometry(load_config("tiny", ["model.mmdit.context_in_dim=32"]))
    with pytest.raises(ValueError, match="trainable_blocks \\[9\\] out of range"):
        FlowMatchingStage(load_config("tiny", ["train.trainable_blocks=[9]"]))
    # the stage is reachable by name in a fresh process (lazy registration in train.stages)
    assert isinstance(get_stage("flow", load_config("tiny")), FlowMatchingStage)
    # mean tokens per example: 17 frames -> 3 units, stage columns 1:2:1, plus 32 text tokens
    assert FlowMatchingStage(load_config("tiny")).tokens_per_example(load_config("tiny")) == 43


def test_switch_of_gradients_is_exact_and_keeps_only_the_largest_layout_alive():
    """Differentiating a plain lax.switch keeps every branch's residuals; ours keeps the largest only."""
    params = {"w": jnp.full((128, 128), 0.01), "b": jnp.ones((128,))}
    sizes = (64, 256, 512)
    key = jax.random.key(3)

    def loss_for(n):
        def f(p):
            x = jnp.ones((n, 128))
            for _ in range(6):
                x = jnp.tanh(x @ p["w"] + p["b"])
            return jnp.mean(x**2), {"rows": jnp.asarray(n, jnp.float32)}

        return f

    def ours(p):
        return switch_value_and_grad(sizes, key, loss_for, p)[0][0]

    def plain(p):
        i = jax.random.randint(key, (), 0, len(sizes))
        return jax.lax.switch(i, [lambda q, n=n: loss_for(n)(q)[0] for n in sizes], p)

    (metrics_loss, metrics), i = jax.jit(lambda p: switch_value_and_grad(sizes, key, loss_for, p))(params)
    assert float(metrics["rows"]) == sizes[int(i)]
    g_ours, g_plain = jax.grad(ours)(params), jax.grad(plain)(params)
    for k in params:
        np.testing.assert_allclose(g_ours[k], g_plain[k], rtol=1e-6, atol=1e-9)
    temp = {name: jax.jit(jax.grad(fn)).lower(params).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("ours", ours), ("plain", plain))}
    assert temp["ours"] < 0.7 * temp["plain"], temp

    # dict losses: each entry differentiates only its own model's parameters (the engine's contract)
    two = {"a": jnp.ones(3), "b": jnp.ones(3)}

    def dict_loss(_):
        return lambda p: ({"a": jnp.sum(p["a"] * p["b"]), "b": 2.0 * jnp.sum(p["b"])}, {})

    (_, vjp_fn) = jax.vjp(lambda p: switch_value_and_grad([0], key, dict_loss, p)[0][0], two)
    ga = vjp_fn({"a": 1.0, "b": 0.0})[0]
    gb = vjp_fn({"a": 0.0, "b": 1.0})[0]
    np.testing.assert_array_equal(ga["a"], 1.0) and np.testing.assert_array_equal(gb["b"], 2.0)


def _random_official_checkpoint(cfg, path):
    """Official-layout random weights with every parameter non-zero (the from-scratch init zeroes the output
    layer and AdaLN, which would leave a frozen-output model with no gradient to test)."""
    rng = np.random.default_rng(0)
    shapes = param_shapes(abstract_mmdit(cfg))
    state = {}
    for e in mmdit_keymap(cfg).entries:
        if e.jax_path is None:
            state[e.torch_key] = e.derive()
        else:
            shape = torch_shape(shapes[e.jax_path], e.layout)
            noise = rng.standard_normal(shape)
            if ".attn.norm_" in e.torch_key:  # QK RMSNorm scales
                state[e.torch_key] = (1.0 + 0.1 * noise).astype(np.float32)
            else:
                state[e.torch_key] = (noise * 0.3 / np.sqrt(shape[-1])).astype(np.float32)
    write_safetensors(state, path)
    return path


def _train_cfg(tmp_path, extra=()):
    return load_config("tiny", [
        "train.stage=flow", "train.steps=16", "train.global_batch=8", "train.peak_flops=1e9",
        "train.tensorboard=false", "train.log_every=100", "train.pyramid_units=[0]", "model.mmdit.num_layers=2",
        "optim.lr=2e-2", "optim.warmup_steps=0", 'optim.schedule="constant"', "optim.weight_decay=0.1",
        "checkpoint.every_steps=100", "data.shuffle=false", "data.source=records",
        f"data.path={tmp_path / 'records'}", f"train.output_dir={tmp_path / 'run'}", *extra,
    ])


def test_flow_stage_overfits_a_fixed_batch_and_frozen_blocks_never_move(tmp_path):
    base = _train_cfg(tmp_path)
    g = flow_geometry(base)
    write_npz_records(tmp_path / "records", [synthetic_record(g, 0, i) for i in range(8)])  # = one fixed batch
    ckpt = _random_official_checkpoint(base.model.mmdit, tmp_path / "init.safetensors")
    cfg = _train_cfg(tmp_path, [f"train.init_checkpoint={ckpt}", "train.trainable_blocks=[1]"])
    stage = get_stage("flow", cfg)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = build_setup(stage, cfg, mesh)
    init = setup.init_state()
    init_params = _flat(init["params"])

    # weights come from the official-layout file
    model = abstract_mmdit(cfg.model.mmdit)
    from neodragon_jax.convert.mmdit import load_mmdit_weights

    load_mmdit_weights(model, ckpt)
    want = _flat({"mmdit": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    assert want.keys() == init_params.keys()
    for k in want:
        np.testing.assert_array_equal(init_params[k], want[k], err_msg=k)
    # the frozen part holds no optimizer moments: only block 1's parameters have Adam mu/nu
    n_block1 = sum(1 for k in init_params if _block(k) == 1)
    moments = [x for x in jax.tree.leaves(init["opt_state"]) if x.ndim > 0]
    assert 0 < len(moments) == 2 * n_block1 < 2 * len(init_params)

    batch = {k: jnp.stack([synthetic_record(g, 0, i)[k] for i in range(8)]) for k in stage.batch_keys()}
    fixed_key = jax.random.key(123)

    @jax.jit
    def eval_loss(params, model_state):
        return stage.loss(setup.modules(params, model_state), {}, batch, fixed_key)[0]

    before = float(eval_loss(init["params"], init["model_state"]))
    result = run(cfg, stage=stage, mesh=mesh, console=False, keep_state=True)
    assert sorted(result.losses) == list(range(16)) and all(np.isfinite(list(result.losses.values())))
    after = float(eval_loss(result.state["params"], result.state["model_state"]))
    # Same batch, same noise and timesteps: it fitted them (measured 0.535 -> 0.446 with one trained block).
    assert after < 0.9 * before, (before, after)
    logged = [result.losses[s] for s in range(16)]
    assert np.mean(logged[-4:]) < np.mean(logged[:4])

    final = _flat(result.state["params"])
    moved = {k for k in final if not np.array_equal(final[k], init_params[k])}
    block1 = {k for k in final if _block(k) == 1}
    assert moved and moved <= block1, sorted(moved - block1)[:5]  # weight decay 0.1 did not touch the rest
    assert len(moved) > len(block1) // 2

    # the masked optimizer state (no moments for frozen leaves) round-trips through the checkpoint
    restored, _, _ = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint, read_only=True).restore(None, setup.abstract_state)
    assert int(restored["step"]) == 16
    for k, v in _flat(restored["opt_state"]).items():
        np.testing.assert_array_equal(v, _flat(result.state["opt_state"])[k], err_msg=k)


def test_records_from_extract_records_feed_the_stage(tmp_path):
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    out = extract_records(tmp_path / "rec", zip(videos, ["a red ball rolls", ""]), cfg)
    files = sorted(out.glob("*.npz"))
    assert len(files) == 2
    with np.load(files[0]) as z:
        rec = {k: z[k] for k in z.files}
    g = flow_geometry(cfg)
    for k, shape in g.shapes().items():
        assert rec[k].shape == shape, k
        assert np.isfinite(rec[k]).all()
    assert str(rec["caption"]) == "a red ball rolls" and rec["text_mask"].sum() >= 1
    assert not np.array_equal(rec["latents"], np.load(files[1])["latents"])
    rcfg = load_config("tiny", ["data.source=records", f"data.path={out}", "train.stage=flow"])
    stage = get_stage("flow", rcfg)
    assert stage.with_null and set(stage.example_batch(rcfg, 4)) == set(g.shapes())

    # the shared cache layout: records without null_* plus null_text.npz beside the records folder
    shared = tmp_path / "cache"
    write_npz_records(shared / "records", [{k: rec[k] for k in ("latents", "text_tokens", "text_mask", "pooled")}])
    np.savez(shared / "null_text.npz", **{k: rec[k][None] for k in ("null_text_tokens", "null_text_mask", "null_pooled")})
    scfg = load_config("tiny", ["data.source=records", f"data.path={shared / 'records'}", "model.mmdit.num_layers=1"])
    sstage = FlowMatchingStage(scfg)
    assert not sstage.with_null and set(sstage.example_batch(scfg, 4)) == {"latents", "text_tokens", "text_mask", "pooled"}
    np.testing.assert_array_equal(sstage.null_text["null_pooled"], rec["null_pooled"][None])
    setup = build_setup(sstage, scfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    loss, _ = jax.eval_shape(lambda s, b: sstage.loss(setup.modules(s["params"], s["model_state"]), {}, b,
                                                      jax.random.key(0)), setup.abstract_state, sstage.example_batch(scfg, 4))
    assert loss.shape == ()

    with pytest.raises(ValueError, match="wants 17 frames of 64x64"):
        extract_records(tmp_path / "bad", [(videos[0][:9], "x")], cfg)
    # records extracted at another size are refused with the fix named
    bad = load_config("tiny", ["data.source=records", f"data.path={out}", "video.height=128", "video.width=128"])
    with pytest.raises(ValueError, match="latents is \\(16, 3, 8, 8\\), the config implies \\(16, 3, 16, 16\\)"):
        FlowMatchingStage(bad)


def test_scanned_blocks_take_the_same_sharded_step_as_the_unrolled_loop(tmp_path):
    """`model.mmdit.scan_blocks` stacks the weights of blocks 0..n-2 inside the step: under an fsdp x tensor
    mesh the loss and the updated parameters must match the unrolled blocks (float32 reassociation only)."""
    from train.data import to_global
    from train.step import batch_sharding_tree, jit_train_step

    common = ["model.mmdit.num_layers=3", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", 'mesh.rules="fsdp_tp"',
              "model.mmdit.num_heads=4"]
    g = flow_geometry(_train_cfg(tmp_path, common))
    write_npz_records(tmp_path / "records", [synthetic_record(g, 0, i) for i in range(8)])
    batch_np = {k: np.stack([synthetic_record(g, 0, i)[k] for i in range(8)]) for k in synthetic_record(g, 0, 0)}
    out = {}
    for scan in (False, True):
        cfg = _train_cfg(tmp_path, common + [f"model.mmdit.scan_blocks={str(scan).lower()}"])
        stage = get_stage("flow", cfg)
        setup = build_setup(stage, cfg, make_mesh(cfg.mesh))
        _, batch_sh = batch_sharding_tree(setup)
        batch = to_global({k: batch_np[k] for k in stage.batch_keys()}, batch_sh, 8)
        # the from-scratch init zeroes the modulation and output layers: perturb so every block matters
        state = setup.init_state(jax.random.key(0))
        state["params"] = jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                                       state["params"])
        step = jit_train_step(setup)
        if scan:
            text = step.lower(setup.abstract_state, setup.abstract_frozen,
                              jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), batch)).as_text()
            assert "while" in text  # the blocks run as a loop, not unrolled
        new_state, metrics = step(state, setup.init_frozen(), batch)
        out[scan] = (float(metrics["loss"]), float(metrics["grad_norm"]), _flat(new_state["params"]))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-4)
    # One Adam step at lr 2e-2 moves a weight by up to ~2e-2; Adam's normalisation can turn a reassociation-
    # sized gradient difference of a near-zero moment into ~1e-5 of movement, so 5e-5 absolute (0.25% of a step).
    for k, v in out[False][2].items():
        np.testing.assert_allclose(out[True][2][k], v, rtol=1e-4, atol=5e-5, err_msg=k)
