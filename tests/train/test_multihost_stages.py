"""The other training stages as real multi-process programs: text-distill (a frozen T5 + CE teacher role, a
prompt corpus), decoder (a frozen VAE encoder role, rendered videos) and dmd (three MMDiT roles, one frozen,
two optimisers, ordered updates) each run as 2 processes x 4 CPU devices under `neodragon launch` and give the
losses of the same run as 1 process x 8 devices (the flow/toy loop, kills and restores are
tests/train/test_multihost.py's).

Each stage is one launch of a few steps: what differs between stages is how their roles are built, placed
and fed, which the first step already exercises; a checkpoint is written at the last step by every process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neodragon_jax.config import load_config
from train.loop import checkpoint_dir, run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
TIMEOUT_S = 420
COMMON = [f"train.steps={STEPS}", "train.global_batch=8", "train.log_every=1", "train.peak_flops=1e9",
          "train.tensorboard=false", "checkpoint.every_steps=3", "optim.warmup_steps=0", "mesh.data=2",
          "mesh.fsdp=4", "mesh.tensor=1", 'mesh.rules="fsdp"']
PROMPTS = [f"a {c} {s} moving {d} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square")
           for d in ("left", "right", "up") for b in ("black", "white")]
VAE_SMALL = ["model.vae.causal.latent_channels=4", "model.vae.causal.block_out_channels=[8,8]",
             "model.vae.causal.spatial_down=[true,true]", "model.vae.causal.temporal_down=[false,false]",
             "model.vae.causal.norm_groups=0", "model.vae.light_decoder.latent_channels=4",
             "model.vae.light_decoder.channels=[8,8]", "model.vae.light_decoder.blocks_per_stage=1",
             "model.vae.light_decoder.spatial_upscale=[true,true]",
             "model.vae.light_decoder.temporal_upscale=[false,false]", "video.height=16", "video.width=16",
             "video.num_frames=3"]


def _settings(stage: str, data: Path) -> list[str]:
    if stage == "text-distill":
        return ["model.text.max_length=12", "model.text.t5.num_layers=1", "model.text.distil_t5.body.num_layers=1",
                "optim.lr=1e-2", f'data.path="{data}"', "stages.text-distill.teacher_init=random",
                "stages.text-distill.mode=train-dt5"]
    if stage == "decoder":
        return VAE_SMALL + ["data.num_synthetic=16", "optim.lr=3e-3", 'stages.decoder.vae="random"']
    if stage == "dmd":
        return ["video.num_frames=9", "model.mmdit.num_layers=1", "train.pyramid_units=[0]", "optim.lr=1e-3",
                "optim.ema_decay=0.9", "stages.dmd.teacher=random", "data.source=records",
                f'data.path="{data}"', "data.shuffle=false"]
    raise ValueError(stage)


def _data(stage: str, tmp: Path) -> Path:
    if stage == "text-distill":
        from neodragon_jax.data.prompts import write_corpus

        write_corpus(tmp / "corpus", PROMPTS, ["a cyan diamond moving down on a gray background"], {"kind": "test"})
        return tmp / "corpus"
    if stage == "dmd":
        from train.data import write_npz_records
        from train.flow_matching import flow_geometry, synthetic_record

        g = flow_geometry(load_config("tiny", ["video.num_frames=9"]))
        write_npz_records(tmp / "records", [synthetic_record(g, 0, i) for i in range(16)])
        return tmp / "records"
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["text-distill", "decoder", "dmd"])
def test_stage_on_two_processes_matches_one_process(stage, tmp_path):
    data = _data(stage, tmp_path)
    settings = COMMON + _settings(stage, data)
    ref = run(load_config("tiny", settings + [f'train.stage="{stage}"', f'train.output_dir="{tmp_path / "ref"}"']),
              console=False)

    work = tmp_path / "two"
    cmd = [sys.executable, "-m", "neodragon_cli", "launch", "-n", "2", "--devices-per-process", "4", "--grace", "2",
           "--", "train", stage, "--config", "tiny", "--workdir", str(work), "--compile-cache", "none"]
    for s in settings:
        cmd += ["--set", s]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_FLAGS="--xla_backend_optimization_level=0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{stage}: the 2-process launch did not finish in {TIMEOUT_S} s:\n{(e.stdout or '')[-3000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "8 cpu device(s) in 2 processes, mesh data=2 x fsdp=4" in out, out[-3000:]

    got = {}
    for line in (work / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        got[rec["step"]] = rec["loss"]
    assert sorted(got) == sorted(ref.losses) == list(range(STEPS))
    np.testing.assert_allclose([got[s] for s in range(STEPS)], [ref.losses[s] for s in range(STEPS)], rtol=1e-5,
                               atol=0, err_msg=stage)
    # every process wrote its shards of the last step's checkpoint, committed once
    cfg = load_config("tiny", settings + [f'train.stage="{stage}"', f'train.output_dir="{work}"'])
    assert (checkpoint_dir(cfg) / str(STEPS)).is_dir()
