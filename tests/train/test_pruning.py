"""Pruning recovery: both block mappings wire the right teacher tensors, stage-2 distillation terms vanish when
the student is the teacher, stage 2 refuses a student that did not pass stage 1, and an engine run of
recover-distill trains only the student (kept teacher blocks copied exactly; the frozen teacher unchanged and
absent from the checkpoint)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neodragon_jax.config import load_config
from neodragon_jax.convert.io import export_state_dict, param_arrays, write_safetensors
from neodragon_jax.convert.mmdit import mmdit_keymap
from neodragon_jax.models.mmdit.model import init_mmdit, prune
from neodragon_jax.pyramid.loss import flow_matching_inputs
from neodragon_jax.pyramid.scheduler import make_schedule
from neodragon_jax.sharding import make_mesh
from tests.eval.test_block_importance import randomise
from train.checkpoint import flat_shapes
from train.data import write_npz_records
from train.flow_matching import flow_geometry, synthetic_record
from train.pruning import (
    PruningError,
    RecoverDistill,
    RecoverFlow,
    block_targets,
    check_curriculum,
    recovery_terms,
)
from train.state import build_setup
from train.weights import flatten, run_state


def test_block_targets_of_both_mappings():
    assert block_targets([0, 2, 3], 4, "simple") == [(0, "out"), (2, "out"), (3, "out")]
    # next-block: the input of the next KEPT teacher block; the last student block matches the teacher's output
    assert block_targets([0, 2, 3], 4, "next-block") == [(2, "in"), (3, "in"), (3, "out")]
    with pytest.raises(PruningError, match="mapping"):
        block_targets([0, 3], 4, "nearest")


@pytest.fixture(scope="module")
def teacher_and_inputs():
    cfg = load_config("tiny")
    teacher = randomise(init_mmdit(cfg.model.mmdit, seed=0), seed=1)
    g = flow_geometry(cfg)
    batch = {k: jnp.stack([synthetic_record(g, 0, i)[k] for i in range(2)]) for k in
             ("latents", "text_tokens", "text_mask", "pooled")}
    inp = flow_matching_inputs(batch, jax.random.key(0), schedule=make_schedule(cfg.pyramid), stage=2, unit=1)
    return teacher, inp


@pytest.mark.parametrize("mapping", ["simple", "next-block"])
def test_distillation_terms_vanish_when_the_student_is_the_teacher(teacher_and_inputs, mapping):
    teacher, inp = teacher_and_inputs
    n = len(teacher.transformer_blocks)
    student = prune(teacher, range(n))
    terms = recovery_terms(student, teacher, inp, block_targets(range(n), n, mapping))
    for name in ("visual", "teacher_flow"):  # the same computation on the same arrays: exactly zero
        assert float(jnp.max(jnp.abs(terms[name]))) == 0.0, (name, terms[name])
    assert float(jnp.max(jnp.abs(terms["text"]))) < 1e-6  # 1 - cos(x, x) in float32 rounding
    assert float(jnp.min(terms["flow"])) > 0  # the ground-truth flow term still trains


def test_mappings_pick_the_teacher_tensor_they_name(teacher_and_inputs):
    teacher, inp = teacher_and_inputs
    n = len(teacher.transformer_blocks)
    kept = [0, 2, n - 1]
    student = prune(teacher, kept)
    args = (inp.clips, inp.cond.tokens, inp.cond.mask, inp.cond.pooled, inp.timestep)
    _, taps_t = teacher(*args, return_taps=True)
    # Student block 0 is teacher block 0 on the same input: "simple" matches it exactly, "next-block" matches
    # it against the input of teacher block 2 (= teacher block 1's output), which block 0 does not produce.
    simple = recovery_terms(student, teacher, inp, block_targets(kept, n, "simple")[:1])
    nxt = recovery_terms(student, teacher, inp, block_targets(kept, n, "next-block")[:1])
    assert float(jnp.max(simple["visual"])) == 0.0 and float(jnp.max(jnp.abs(simple["text"]))) < 1e-6
    assert float(jnp.min(nxt["visual"])) > 1e-6 and float(jnp.min(nxt["text"])) > 1e-6
    _, taps_s = student(*args, return_taps=True)
    want = jnp.mean(jnp.square(taps_s[0]["img_out"] - taps_t[1]["img_out"]), axis=(1, 2))
    np.testing.assert_allclose(nxt["visual"], want, rtol=1e-6)
    np.testing.assert_array_equal(taps_t[2]["img_in"], taps_t[1]["img_out"])


def test_stage2_refuses_a_student_that_did_not_pass_stage1(tmp_path):
    with pytest.raises(PruningError, match="has not passed stage 1"):
        check_curriculum("", force=False)
    with pytest.raises(PruningError, match="has not passed stage 1"):
        check_curriculum("official:/some/pruned", force=False)
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "config.json").write_text(json.dumps({"train": {"stage": "flow"}}))
    with pytest.raises(PruningError, match="is a run of stage 'flow'"):
        check_curriculum(f"run:{tmp_path / 'flow'}:ema", force=False)
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "config.json").write_text(json.dumps({"train": {"stage": "recover-flow"}}))
    check_curriculum(f"run:{tmp_path / 's1'}@10:ema", force=False)
    check_curriculum(f"run:{tmp_path / 's1' / 'checkpoints'}", force=False)
    check_curriculum("", force=True)
    check_curriculum(f"run:{tmp_path / 'flow'}", force=True)
    cfg = load_config("tiny", ["stages.recover-distill.kept=[0,3]"])
    with pytest.raises(PruningError, match="has not passed stage 1"):
        RecoverDistill(cfg)
    with pytest.raises(PruningError, match="must be kept"):
        RecoverFlow(load_config("tiny", ["stages.recover-flow.kept=[0,2]"]))
    with pytest.raises(PruningError, match="no student"):
        RecoverFlow(load_config("tiny"))


def _official_teacher_file(cfg, path):
    model = randomise(init_mmdit(cfg.model.mmdit, seed=0), seed=2)
    write_safetensors(export_state_dict(model, mmdit_keymap(cfg.model.mmdit)), path)
    return model


def test_recover_distill_run_trains_only_the_student_from_the_kept_teacher_blocks(tmp_path):
    from train.loop import run

    kept = [0, 2, 3]
    base = load_config("tiny")
    teacher = _official_teacher_file(base, tmp_path / "teacher.safetensors")
    g = flow_geometry(base)
    write_npz_records(tmp_path / "records", [synthetic_record(g, 0, i) for i in range(8)])
    cfg = load_config("tiny", [
        "train.stage=recover-distill", "train.steps=2", "train.global_batch=4", "train.peak_flops=1e9",
        "train.tensorboard=false", "train.log_every=1", "train.pyramid_units=[0]", "optim.warmup_steps=0",
        "checkpoint.every_steps=2", "data.source=records", f"data.path={tmp_path / 'records'}",
        f"train.output_dir={tmp_path / 'run'}", f"stages.recover-distill.teacher=official:{tmp_path / 'teacher.safetensors'}",
        f"stages.recover-distill.kept=[{','.join(map(str, kept))}]", "stages.recover-distill.force=true",
        "stages.recover-distill.mapping=next-block"])
    stage = RecoverDistill(cfg)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = build_setup(stage, cfg, mesh)
    want_teacher = param_arrays(teacher)
    want_student = param_arrays(prune(teacher, kept))
    init = flatten(jax.device_get(init_state := setup.init_state())["params"]["student"])
    assert set(init) == set(want_student)
    for k, v in want_student.items():  # kept blocks and shared layers copied exactly
        np.testing.assert_array_equal(init[k], v, err_msg=k)
    del init_state

    result = run(cfg, stage=stage, mesh=mesh, console=False)
    assert result.end_step == 2 and np.isfinite(result.last_metrics["loss"])
    assert {"term/visual", "term/text", "term/teacher_flow", "term/flow"} <= set(result.last_metrics)
    step, saved = run_state(tmp_path / "run")
    roles = {k.split("/")[1] for k in flat_shapes(saved) if k.startswith(("params/", "opt_state/", "ema/"))}
    assert step == 2 and roles == {"student"}, roles
    trained = flatten(saved["params"]["student"])
    assert any(not np.array_equal(trained[k], v) for k, v in want_student.items())
    frozen = flatten(jax.device_get(setup.init_frozen()["teacher"]["params"]))
    for k, v in want_teacher.items():  # the teacher is exactly the file
        np.testing.assert_array_equal(frozen[k], v, err_msg=k)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["stages"]["recover-distill"]["kept"] == kept
