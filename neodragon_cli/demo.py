"""`neodragon demo`: the whole job on a CPU - data, VAE, latents, flow teacher, generation, scoring, report.

Phases, each in its own folder under ``--workdir`` (default ``runs/demo``):

``data``      synthetic captioned videos over the TRAIN (colour, shape, motion) triples, plus held-out videos
              whose triples never occur in training (their captions are the evaluation prompts);
``vae``       the ``vae`` stage: the tiny causal VAE (encoder + native decoder) trained on clip crops; then the
              latent shift / scale of the trained VAE (the DiT's latent normalisation) is measured;
``text``      the frozen text stack (the tiny preset's random-init teacher T5 + CLIP pair), saved once;
``latents``   pre-extracted records: VAE latents + text features (``neodragon_jax.data.extract``);
``flow``      the ``flow`` stage: the tiny MMDiT teacher trained with pyramidal flow matching on the records;
``samples``   one video per held-out prompt with the teacher schedule (``sampling`` of the config), from a
              pipeline built of the trained modules;
``eval``      VAE reconstruction PSNR / SSIM on the held-out videos; the pixel scorer on the renders, on the
              VAE reconstructions and on the generated videos;
``report.md`` with PNG contact sheets under ``report/``.

A finished phase leaves ``<phase>/DONE.json`` (its settings, results and wall time) and is reused by a later
run; an interrupted training phase resumes from its last checkpoint, an interrupted generation from the
last finished video. A workdir built with other settings is refused (the differing keys are named).
``--quick`` runs every phase at toy sizes (the CI check). Demo sizes are ``--set demo.<field>=value``
(:class:`DemoSettings`); any other ``--set`` is a config override.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = "runs/demo"
REPORT = "report.md"
TARGETS = {"colour": 0.8, "motion": 0.6}


class DemoError(Exception):
    """A user-facing problem (bad setting, workdir built with other settings): one line, exit status 2."""


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (``--set demo.<field>=value``). The defaults finish in about 20 minutes on 2 CPU
    cores; :data:`QUICK` goes through every phase in well under 2 minutes."""

    train_videos: int = 1200
    eval_videos: int = 48          # held-out prompts: generated, scored; their renders measure the VAE
    two_object_prob: float = 0.0   # held-out prompts have one object; two-object scenes only cost capacity
    data_seed: int = 0
    eval_seed: int = 1
    vae_steps: int = 600
    vae_batch: int = 4
    # Training crop: frames x crop x crop pixels. The demo's VAE does not compress time, so a 9-frame crop
    # trains every latent frame and costs half a 17-frame one (measured on 17-frame held-out clips after 1500
    # steps: 22.3 dB from 9-frame crops, 23.6 dB from 17-frame crops in twice the time). With temporal
    # compression (``model.vae.causal.temporal_down``) use whole clips: every latent of a 9-frame crop sees
    # the causal padding, and such a VAE fails on the third latent of a 17-frame clip (20.1 dB on 9-frame
    # clips, 15.3 dB on 17-frame clips).
    vae_frames: int = 9
    vae_crop: int = 32
    vae_lr: float = 5e-4
    vae_init: str = "inflated"     # VAEStage kernel_init: "inflated", "lecun" or "official"
    vae_zero_init: bool = True     # VAEStage zero_init_residual: residual branches start at zero
    # Flow: on the 4x latents a CPU step of batch 4 is 2.7 steps/s against 1.06 at batch 8, and more updates
    # at a higher rate beat fewer, larger ones (600 steps of 8 at lr 5e-4: finest-stage loss 0.332; 1200 of 4
    # at 2e-3: 0.219, in less time; the per-patch linear baseline is 0.276; README "Demo").
    flow_steps: int = 1300
    flow_batch: int = 4
    flow_lr: float = 2e-3
    flow_warmup: int = 100
    flow_ema: float = 0.0          # > 0: keep an EMA of the MMDiT and generate with it
    # > 0: the flow phase stops after this many seconds (compilation included) at the step it reached,
    # checkpointed, and the demo goes on with that teacher; for a time-boxed machine (use a schedule that
    # does not depend on the step count, e.g. optim.decay_steps, since the run may end early).
    flow_time_limit: float = 0.0
    flow_decay_steps: int = 0      # cosine length after warmup; 0 = until flow_steps (see flow_time_limit)
    extract_batch: int = 8
    text_seed: int = 0
    devices: int = 0               # devices to train on; 0 = one on CPU (XLA uses every core), all otherwise
    sheet_videos: int = 8          # rows of each contact sheet

    @classmethod
    def fields(cls) -> dict[str, type]:
        return {f.name: type(f.default) for f in dataclasses.fields(cls)}


QUICK = DemoSettings(train_videos=48, eval_videos=4, vae_steps=2, vae_batch=4, vae_frames=9, vae_crop=16,
                     flow_steps=2, flow_batch=4, flow_warmup=0, extract_batch=4, sheet_videos=4)

#: Config overrides the demo applies on top of --config (before --set). The VAE trained here has the native
#: decoder and narrower full-resolution layers than the tiny preset (8 instead of 16 channels at full
#: resolution, 16 instead of 32 at half). It compresses space 4x (16x16x16 latents for 64x64 frames) and not
#: time, and its norms keep their affine but no statistics (``norm_groups=0``). Measured on the held-out renders
#: (README "Demo"): 600 steps of this VAE reconstruct them at 26.8 dB with colour / motion accuracy 0.96 / 0.96
#: in 6 minutes; the 8x layout reached 24.4 dB and 0.54 / 0.52 in 14 (its objects live in one or two latent
#: cells), and the official layout (8x, time compression, per-frame GroupNorm) 19.2 dB and 0.08 / 0.10.
#: The 17 latent frames are generated as the first frame, then two 8-frame units (``pyramid.frames_per_unit=8``:
#: three training layouts, like the official 8x VAE's three latents). The MMDiT is twice the tiny preset's
#: width (8 heads: 128 channels for a 2x2x16 = 64-value token; at 64 channels its finest-stage loss stayed above
#: a per-patch linear denoiser's, ``neodragon_jax.eval.flow_baseline``), and its positional table is the finest
#: 8x8 patch grid, so neighbouring patches sit one sin-cos unit apart instead of a quarter. Its first three
#: blocks run as one scan (``model.mmdit.scan_blocks``): the flow train step compiles in 42 s instead of 50.
DEMO_OVERRIDES = ('model.vae.decoder="native"', "model.vae.causal.block_out_channels=[8,16,32,32]",
                  "model.vae.causal.norm_groups=0", "model.vae.causal.spatial_down=[true,true,false,false]",
                  "model.vae.causal.temporal_down=[false,false,false,false]", "pyramid.frames_per_unit=8",
                  "model.mmdit.num_heads=8", "model.mmdit.pos_embed_max_size=8", "model.mmdit.scan_blocks=true")
#: Extra overrides of --quick (short compiles): 9-frame clips (the first frame + one 8-frame unit), a 3-block
#: VAE (8x spatial, no time compression: 8x8 latents), a 1-block MMDiT trained on one pyramid layout.
QUICK_OVERRIDES = ("video.num_frames=9", "model.vae.causal.block_out_channels=[8,8,8]",
                   "model.vae.causal.spatial_down=[true,true,true]",
                   "model.vae.causal.temporal_down=[false,false,false]",
                   "model.mmdit.num_layers=1", "train.pyramid_units=[1]")


def parse_settings(overrides: list[str], quick: bool) -> tuple[DemoSettings, list[str]]:
    """Split ``--set`` items into demo settings (``demo.*``) and config overrides."""
    from neodragon_jax.config import parse_override

    base = QUICK if quick else DemoSettings()
    types = DemoSettings.fields()
    changes, config_overrides = {}, []
    for item in overrides:
        for o in item.split():
            key, value = parse_override(o)
            if not key.startswith("demo."):
                config_overrides.append(o)
                continue
            name = key[len("demo."):]
            if name not in types:
                raise DemoError(f"unknown demo setting {key!r}; valid: {', '.join('demo.' + k for k in types)}")
            tp = types[name]
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise DemoError(f"{key}={value!r}: expected {tp.__name__}")
            changes[name] = value
    s = dataclasses.replace(base, **changes)
    for name in ("train_videos", "eval_videos", "vae_steps", "vae_batch", "flow_steps", "flow_batch",
                 "extract_batch", "sheet_videos"):
        if getattr(s, name) < 1:
            raise DemoError(f"demo.{name} must be >= 1, got {getattr(s, name)}")
    from train.vae import KERNEL_INITS

    if s.vae_init not in KERNEL_INITS:
        raise DemoError(f"demo.vae_init must be one of {', '.join(KERNEL_INITS)}, got {s.vae_init!r}")
    if s.flow_decay_steps < 0:
        raise DemoError(f"demo.flow_decay_steps must be >= 0 (0 = until demo.flow_steps), got {s.flow_decay_steps}")
    if s.flow_time_limit < 0:
        raise DemoError(f"demo.flow_time_limit must be >= 0 seconds (0 = none), got {s.flow_time_limit}")
    if not 0.0 <= s.two_object_prob <= 1.0:
        raise DemoError(f"demo.two_object_prob must be in [0, 1], got {s.two_object_prob}")
    return s, config_overrides


# --------------------------------------------------------------------------------------------- phases
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Phase:
    """One phase's folder: ``PHASE.json`` (its key, written when it starts) and ``DONE.json`` (key, results,
    seconds) when it finishes. A key that differs from the folder's is refused, naming the differing keys."""

    def __init__(self, workdir: Path, name: str, key: dict, upstream: "Phase | None" = None):
        self.workdir, self.name = workdir, name
        self.dir = workdir / name
        # Through JSON once, so the key compares equal to its saved copy (tuples come back as lists).
        self.key = json.loads(json.dumps(dict(key, upstream=upstream.digest if upstream is not None else None),
                                         sort_keys=True, default=str))
        self.digest = _digest(self.key)
        self.ran = False
        self.seconds = 0.0
        self.results: dict = {}

    def _check(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("key") != self.key:
            keys = _diff(saved.get("key", {}), self.key) or ["(format)"]
            hint = " (an earlier phase changed)" if keys == ["upstream"] else ""
            raise DemoError(
                f"{self.dir} was built with other settings (differs in: {', '.join(keys)}){hint}. Use another "
                f"--workdir, or delete {self.dir} and the phases after it to rebuild them"
            )
        return saved

    def done(self) -> bool:
        saved = self._check(self.dir / "DONE.json")
        if saved is None:
            self._check(self.dir / "PHASE.json")
            return False
        self.results, self.seconds = saved.get("results", {}), float(saved.get("seconds", 0.0))
        return True

    def start(self) -> float:
        _write_json(self.dir / "PHASE.json", {"key": self.key})
        self.ran = True
        return time.perf_counter()

    def finish(self, t0: float, **results) -> None:
        self.seconds = time.perf_counter() - t0
        self.results = results
        _write_json(self.dir / "DONE.json", {"key": self.key, "seconds": self.seconds, "results": results})


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class TrainProgress(threading.Thread):
    """Prints ``[phase] step s/N (p%) | r step/s | ETA | metrics`` every ``every`` seconds by reading the
    engine's ``metrics.jsonl`` (the rate comes from the logged step times after the first step, so
    compilation is not in it)."""

    def __init__(self, name: str, metrics: Path, total: int, keys: tuple[str, ...], every: float = 10.0):
        super().__init__(daemon=True)
        self.name_, self.path, self.total, self.keys, self.every = name, metrics, total, keys, every
        self.stop_event = threading.Event()
        self.offset = metrics.stat().st_size if metrics.is_file() else 0
        self.steps_seen = 0
        self.step_seconds = 0.0  # summed host step times: the rate excludes compiling and checkpoint saves
        self.last: dict | None = None

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        lines = chunk.split("\n")
        self.offset += len(chunk) - len(lines[-1])  # leave a partly written line for the next read
        for line in lines[:-1]:
            if line.strip():
                row = json.loads(line)
                if self.last is not None:  # the first step's time is mostly compilation
                    self.steps_seen += 1
                    self.step_seconds += float(row.get("step_time", 0.0))
                self.last = row

    def line(self) -> str | None:
        if self.last is None:
            return None
        s = int(self.last["step"]) + 1
        parts = [f"[{self.name_}] step {s}/{self.total} ({100 * s / self.total:.0f}%)"]
        if self.steps_seen and self.step_seconds > 0:
            rate = self.steps_seen / self.step_seconds
            parts += [f"{rate:.2f} step/s", f"ETA {_fmt_time((self.total - s) / rate)}"]
        parts += [f"{k} {self.last[k]:.4g}" for k in self.keys if k in self.last]
        return " | ".join(parts)

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            self._read()
            line = self.line()
            if line:
                _say(line)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self._read()
        line = self.line()
        if line:
            _say(line)


# ----------------------------------------------------------------------------------------- the demo
@dataclasses.dataclass
class DemoContext:
    workdir: Path
    settings: DemoSettings
    cfg: Any            # base config (tiny + demo overrides + --set)
    mesh: Any
    quick: bool
    argv: list[str]


def _mesh(settings: DemoSettings):
    import jax

    from neodragon_jax.sharding import make_mesh

    devices = jax.devices()
    n = settings.devices or (1 if devices[0].platform == "cpu" else len(devices))
    if n > len(devices):
        raise DemoError(f"demo.devices={n} but only {len(devices)} devices are available")
    for name in ("vae_batch", "flow_batch"):
        if getattr(settings, name) % n:
            raise DemoError(f"demo.{name}={getattr(settings, name)} must be a multiple of the {n} training devices")
    return make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices=devices[:n])


def _phase_config(ctx: DemoContext, *, stage: str, steps: int, batch: int, out: Path, optim: dict, data: dict,
                  base=None, log_every: int = 10, time_limit_s: float = 0.0):
    cfg = base or ctx.cfg
    n = int(ctx.mesh.devices.size)
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, stage=stage, steps=steps, global_batch=batch, output_dir=str(out),
                                  log_every=log_every, tensorboard=False, time_limit_s=time_limit_s),
        optim=dataclasses.replace(cfg.optim, **optim),
        data=dataclasses.replace(cfg.data, **data),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=True, every_steps=_checkpoint_every(steps),
                                       keep_latest=1),
        mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=n, tensor=1),
    )


def _checkpoint_every(steps: int) -> int:
    """Every 250 steps, or 20 checkpoints a run for long ones (an accelerator runs tens of steps a second)."""
    return max(1, min(steps, max(250, steps // 20)))


def _latest_step(cfg) -> int | None:
    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir

    d = checkpoint_dir(cfg)
    if not d.is_dir():
        return None
    logging.getLogger("absl").setLevel(logging.ERROR)
    ck = Checkpointer(d, cfg.checkpoint, read_only=True)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def _train(ctx: DemoContext, phase: Phase, cfg, stage, keys: tuple[str, ...]) -> tuple[dict, int]:
    """Run (or resume) a training stage to ``cfg.train.steps`` (or its ``train.time_limit_s``) with progress
    lines; returns its last metrics and the step it ended at."""
    from train.loop import run

    latest = _latest_step(cfg)
    if latest is not None and latest >= cfg.train.steps:
        _say(f"[{phase.name}] checkpoint at step {latest} already complete")
        return {}, latest
    if latest is not None:
        _say(f"[{phase.name}] resuming from the checkpoint at step {latest} of {cfg.train.steps}")
    _say(f"[{phase.name}] building the models and compiling the train step ...")
    progress = TrainProgress(phase.name, Path(cfg.train.output_dir) / "metrics.jsonl", cfg.train.steps, keys,
                             every=2.0 if ctx.quick else 10.0)
    progress.start()
    try:
        result = run(cfg, stage=stage, mesh=ctx.mesh, console=False)
    finally:
        progress.stop()
    if result.time_limited:
        _say(f"[{phase.name}] time limit of {cfg.train.time_limit_s:g} s reached: stopped at step "
             f"{result.end_step} of {cfg.train.steps}")
    return {k: float(v) for k, v in result.last_metrics.items()}, result.end_step


def _num_params(module) -> int:
    import jax
    from flax import nnx

    return int(sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def restore_modules(stage, cfg, mesh, *, use_ema: bool = True) -> dict:
    """The trained modules of ``stage`` from the latest checkpoint under ``cfg``'s run folder (the EMA
    weights when the run kept an EMA and ``use_ema``)."""
    from train.checkpoint import Checkpointer
    from train.loop import checkpoint_dir
    from train.state import build_setup

    setup = build_setup(stage, cfg, mesh)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns that a read-only manager never saves
    ck = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint, read_only=True)
    try:
        step = ck.latest_step()
        if step is None:
            raise DemoError(f"no checkpoint under {checkpoint_dir(cfg)}")
        state, _, _ = ck.restore(step, setup.abstract_state)
    finally:
        ck.close()
    params = state["ema"] if use_ema and state.get("ema") else state["params"]
    return setup.modules(params, state["model_state"])


# -- phase: data ----------------------------------------------------------------------------------------
def phase_data(ctx: DemoContext) -> Phase:
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.data.synthetic import write_dataset

    s, v = ctx.settings, ctx.cfg.video
    key = {"train_videos": s.train_videos, "eval_videos": s.eval_videos, "two_object_prob": s.two_object_prob,
           "data_seed": s.data_seed, "eval_seed": s.eval_seed, "size": [v.height, v.width], "frames": v.num_frames,
           "fps": v.fps}
    ph = Phase(ctx.workdir, "data", key)
    if ph.done():
        return ph
    t0 = ph.start()
    split = split_combinations()
    _say(f"[data] rendering {s.train_videos} training videos ({len(split.train)} training triples) and "
         f"{s.eval_videos} held-out videos ({len(split.held_out)} held-out triples)")
    common = dict(height=v.height, width=v.width, num_frames=v.num_frames, fps=v.fps)
    write_dataset(ph.dir / "train", n=s.train_videos, seed=s.data_seed, split=split,
                  two_object_prob=s.two_object_prob, **common)
    write_dataset(ph.dir / "heldout", n=s.eval_videos, seed=s.eval_seed, held_out=True, **common)
    ph.finish(t0, train_triples=len(split.train), heldout_triples=len(split.held_out))
    return ph


# -- phase: vae -------------------------------------------------------------------------------------------
def _vae_stage_and_config(ctx: DemoContext, ph: Phase, data: Phase):
    from train.vae import VAEStage

    s = ctx.settings
    cfg = _phase_config(ctx, stage="vae", steps=s.vae_steps, batch=s.vae_batch, out=ph.dir,
                        optim={"lr": s.vae_lr, "warmup_steps": min(50, s.vae_steps // 10), "end_lr_ratio": 0.1,
                               "b2": 0.99, "ema_decay": 0.0},
                        data={"source": "synthetic", "path": str((data.dir / "train").absolute()),
                              "seed": s.data_seed})
    stage = VAEStage(cfg, clip_frames=s.vae_frames, crop=s.vae_crop, kernel_init=s.vae_init,
                     zero_init_residual=s.vae_zero_init)
    return stage, cfg


def _load_videos(folder: Path, cfg, limit: int | None = None):
    import numpy as np

    from neodragon_jax.data.video_folder import VideoFolder

    vf = VideoFolder.from_config(folder, cfg)
    items = [it for it in (vf.get(i) for i in range(min(len(vf), limit or len(vf)))) if it is not None]
    if not items:
        raise DemoError(f"no readable video in {folder}")
    return np.stack([it["video"] for it in items]), [it["text"] for it in items]


def phase_vae(ctx: DemoContext, data: Phase) -> tuple[Phase, Any]:
    s = ctx.settings
    key = {"vae_steps": s.vae_steps, "vae_batch": s.vae_batch, "vae_frames": s.vae_frames, "vae_crop": s.vae_crop,
           "vae_lr": s.vae_lr, "vae_init": s.vae_init, "vae_zero_init": s.vae_zero_init,
           "model.vae": dataclasses.asdict(ctx.cfg.model.vae),
           "precision": dataclasses.asdict(ctx.cfg.precision), "optim": dataclasses.asdict(ctx.cfg.optim)}
    ph = Phase(ctx.workdir, "vae", key, upstream=data)
    stage, cfg = _vae_stage_and_config(ctx, ph, data)
    if ph.done():
        return ph, restore_modules(stage, cfg, ctx.mesh)["vae"]
    t0 = ph.start()
    metrics, _ = _train(ctx, ph, cfg, stage, ("loss", "psnr", "ssim"))
    vae = restore_modules(stage, cfg, ctx.mesh)["vae"]
    from train.vae import latent_normalisation

    _say("[vae] measuring the latent normalisation of the trained VAE")
    videos, _ = _load_videos(data.dir / "train", ctx.cfg, limit=64)
    norm = latent_normalisation(vae, videos, batch_size=4)
    _say("[vae] latent normalisation: " + ", ".join(f"{k} {v:.4f}" for k, v in norm.items()))
    ph.finish(t0, train_metrics=metrics, normalisation=norm, params=_num_params(vae))
    return ph, vae


def _with_normalisation(cfg, norm: dict):
    causal = dataclasses.replace(cfg.model.vae.causal, **norm)
    vae = dataclasses.replace(cfg.model.vae, causal=causal)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vae=vae))


# -- the frozen text stack ----------------------------------------------------------------------------------
def _key_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def text_stack(cfg, path: Path, seed: int):
    """The frozen (random-init) text conditioner; its weights are saved to ``path`` once and read back after,
    so extraction and generation always see the same weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from neodragon_jax.layers.core import as_dtype
    from neodragon_jax.models.build import init_jit
    from neodragon_jax.models.text.conditioner import TextConditioner

    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=as_dtype(cfg.precision.param_dtype))
    model = init_jit(lambda: TextConditioner(cfg.model.text, rngs=nnx.Rngs(seed), **kw))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    if path.is_file():
        with np.load(path) as z:
            names = [_key_name(p) for p, _ in leaves]
            missing = [n for n in names if n not in z.files]
            if missing or len(z.files) != len(names):
                raise DemoError(f"{path} does not fit model.text of this config (missing {missing[:3]}...); "
                                f"delete it and the latents/flow/samples phases to rebuild")
            new = [jnp.asarray(z[n]) for n in names]
        pure = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), new)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{_key_name(p): np.asarray(v) for p, v in leaves})
        os.replace(tmp, path)
    return model


# -- phase: latents ----------------------------------------------------------------------------------------
def phase_latents(ctx: DemoContext, data: Phase, vae_phase: Phase, vae, text, cfg) -> Phase:
    from neodragon_jax.data.extract import extract

    s = ctx.settings
    key = {"model.text": dataclasses.asdict(cfg.model.text), "text_seed": s.text_seed,
           "extract_batch": s.extract_batch}
    ph = Phase(ctx.workdir, "latents", key, upstream=vae_phase)
    if ph.done():
        return ph
    t0 = ph.start()
    _say(f"[latents] encoding {s.train_videos} videos with the trained VAE and the frozen text stack")
    res = extract(data.dir / "train", ph.dir, cfg, vae=vae, text=text, seed=s.data_seed, batch_size=s.extract_batch,
                  null_in_records=True)
    if res.done == 0:
        raise DemoError(f"no record could be extracted from {data.dir / 'train'}")
    ph.finish(t0, records=res.done, skipped=res.skipped)
    return ph


# -- phase: flow ------------------------------------------------------------------------------------------
def _flow_stage_and_config(ctx: DemoContext, ph: Phase, latents: Phase, cfg):
    from train.stages import get_stage

    s = ctx.settings
    records = latents.dir / "records"
    fcfg = _phase_config(ctx, stage="flow", steps=s.flow_steps, batch=s.flow_batch, out=ph.dir, base=cfg,
                         time_limit_s=s.flow_time_limit,
                         optim={"lr": s.flow_lr, "warmup_steps": min(s.flow_warmup, s.flow_steps // 2),
                                "end_lr_ratio": 0.05, "ema_decay": s.flow_ema, "b2": 0.99,
                                "decay_steps": s.flow_decay_steps},
                         data={"source": "records", "path": str(records.absolute()), "seed": s.data_seed,
                               "in_memory": _records_fit_in_memory(records)})
    return get_stage("flow", fcfg), fcfg


#: Records up to this size are read into host memory once: on an accelerator, reading a batch's npz files
#: each step (about 1 ms per record on this machine) would otherwise bound the step rate.
IN_MEMORY_RECORDS_BYTES = 4 << 30


def _records_fit_in_memory(records: Path) -> bool:
    return records.is_dir() and sum(f.stat().st_size for f in records.glob("*.npz")) <= IN_MEMORY_RECORDS_BYTES


def phase_flow(ctx: DemoContext, latents: Phase, cfg) -> tuple[Phase, Any]:
    s = ctx.settings
    key = {"flow_steps": s.flow_steps, "flow_batch": s.flow_batch, "flow_lr": s.flow_lr, "flow_warmup": s.flow_warmup,
           "flow_ema": s.flow_ema, **({"flow_time_limit": s.flow_time_limit} if s.flow_time_limit else {}),
           **({"flow_decay_steps": s.flow_decay_steps} if s.flow_decay_steps else {}),
           "model.mmdit": dataclasses.asdict(cfg.model.mmdit),
           "pyramid": dataclasses.asdict(cfg.pyramid), "train.pyramid_units": list(cfg.train.pyramid_units),
           "optim": dataclasses.asdict(cfg.optim), "precision": dataclasses.asdict(cfg.precision)}
    ph = Phase(ctx.workdir, "flow", key, upstream=latents)
    stage, fcfg = _flow_stage_and_config(ctx, ph, latents, cfg)
    if ph.done():
        return ph, restore_modules(stage, fcfg, ctx.mesh)["mmdit"]
    t0 = ph.start()
    metrics, steps = _train(ctx, ph, fcfg, stage, ("loss", "loss/stage0", "loss/stage1", "loss/stage2"))
    mmdit = restore_modules(stage, fcfg, ctx.mesh)["mmdit"]
    ph.finish(t0, train_metrics=metrics, params=_num_params(mmdit), steps=steps)
    return ph, mmdit


# -- phase: samples -----------------------------------------------------------------------------------------
def phase_samples(ctx: DemoContext, data: Phase, flow: Phase, pipe) -> Phase:
    from tqdm.auto import tqdm

    from neodragon_jax.data.synthetic import read_scenes
    from neodragon_jax.data.video_io import contact_sheet, write_mp4, write_png
    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    sm = pipe.cfg.sampling
    key = {"sampling": dataclasses.asdict(sm), "video.num_frames": pipe.cfg.video.num_frames}
    ph = Phase(ctx.workdir, "samples", key, upstream=flow)
    if ph.done():
        return ph
    t0 = ph.start()
    rows = read_scenes(data.dir / "heldout")
    todo = [i for i in range(len(rows)) if not (ph.dir / f"{i:03d}.json").is_file()]
    if len(todo) < len(rows):
        _say(f"[samples] {len(rows) - len(todo)} of {len(rows)} videos already generated, continuing")
    _say(f"[samples] teacher schedule {'-'.join(map(str, sm.first_unit_steps))},"
         f"{'-'.join(map(str, sm.later_unit_steps))} with CFG {sm.first_unit_cfg:g},{sm.later_unit_cfg:g}")
    bar = tqdm(todo, desc="[samples] generating", unit="video", dynamic_ncols=True, file=sys.stdout)
    for i in bar:
        row = rows[i]
        res = pipe.generate(GenerationRequest(prompt=row["text"], seed=i))
        stem = ph.dir / f"{i:03d}"
        write_mp4(res.frames, stem.with_suffix(".mp4"), fps=pipe.cfg.video.fps)
        write_png(contact_sheet(res.frames, columns=9), stem.with_name(stem.name + "_frames.png"))
        _write_json(stem.with_suffix(".json"), {
            "prompt": res.prompt, "seed": res.seed, "schedule": res.schedule, "nfe": res.nfe,
            "timings_s": res.timings, "source_video": row["video"], "weights": pipe.source})
    bar.close()
    (ph.dir / "captions.jsonl").write_text(
        "".join(json.dumps({"video": f"{i:03d}.mp4", "text": r["text"]}) + "\n" for i, r in enumerate(rows)))
    nfe = json.loads((ph.dir / "000.json").read_text())["nfe"]
    ph.finish(t0, videos=len(rows), nfe_per_video=nfe)
    return ph


# -- phase: eval ------------------------------------------------------------------------------------------
def phase_eval(ctx: DemoContext, data: Phase, samples: Phase, vae, cfg) -> Phase:
    import numpy as np
    from tqdm.auto import tqdm

    from neodragon_jax.data.video_io import read_video, to_uint8_frames, write_png
    from neodragon_jax.eval.report import labelled_sheet
    from neodragon_jax.eval.scorer import score_pairs
    from train.vae import reconstruct

    ph = Phase(ctx.workdir, "eval", {"sheet_videos": ctx.settings.sheet_videos}, upstream=samples)
    if ph.done():
        return ph
    t0 = ph.start()
    videos, texts = _load_videos(data.dir / "heldout", cfg)
    _say(f"[eval] reconstructing {len(videos)} held-out videos with the trained VAE")
    rec, psnr, ssim = reconstruct(vae, videos, batch_size=4)
    renders = [to_uint8_frames(v) for v in videos]
    recons = [to_uint8_frames(r) for r in rec]
    gen = [read_video(samples.dir / f"{i:03d}.mp4")[0] for i in range(len(texts))]
    scores = {}
    for name, vids in (("renders", renders), ("vae_recon", recons), ("generated", gen)):
        pairs = tqdm(list(zip(vids, texts)), desc=f"[eval] scoring {name}", unit="video", dynamic_ncols=True,
                     file=sys.stdout)
        scores[name] = score_pairs(pairs)
    n = min(ctx.settings.sheet_videos, len(texts))
    def inter(a, b, la, lb):  # rows a0, b0, a1, b1, ...
        return [x for pair in zip(a, b) for x in pair], [x for pair in zip(la, lb) for x in pair]

    v1, l1 = inter(renders[:n], recons[:n], [f"render: {t}" for t in texts[:n]],
                   [f"VAE reconstruction ({p:.1f} dB)" for p in psnr[:n]])
    write_png(labelled_sheet(v1, l1), ph.dir / "vae_reconstructions.png")
    v2, l2 = inter(renders[:n], gen[:n], [f"prompt: {t}" for t in texts[:n]], ["generated (teacher schedule)"] * n)
    write_png(labelled_sheet(v2, l2), ph.dir / "generated_vs_render.png")
    per_video = []
    for i, sc in enumerate(scores["generated"].videos):
        per_video.append({"prompt": texts[i], "psnr_recon": float(psnr[i]),
                          "judgements": {a: [bool(x) for x in v] for a, v in sc.judgements.items()}})
    flow_vs_linear = _flow_vs_linear(ctx, cfg)
    ph.finish(t0, psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)), psnr_per_video=[float(p) for p in psnr],
              scores={k: v.to_dict() for k, v in scores.items()}, per_video=per_video, flow_vs_linear=flow_vs_linear)
    return ph


def _flow_vs_linear(ctx: DemoContext, cfg) -> list[dict]:
    """Per pyramid stage: the teacher's training loss (last 10% of steps) beside the loss of a per-patch linear
    denoiser on the same targets (``neodragon_jax.eval.flow_baseline``), on up to 400 latent records."""
    from neodragon_jax.eval.flow_baseline import teacher_vs_baseline
    from neodragon_jax.pyramid.scheduler import make_schedule

    _say("[eval] per-patch linear baseline of the flow targets")
    try:
        rows, _ = teacher_vs_baseline(ctx.workdir / "latents" / "records", ctx.workdir / "flow" / "metrics.jsonl",
                                      make_schedule(cfg.pyramid), cfg.model.mmdit.patch_size,
                                      seed=ctx.settings.data_seed)
    except ValueError as e:  # too few patches to fit (a toy run)
        _say(f"[eval] no linear baseline: {e}")
        return []
    return rows


# -- report -------------------------------------------------------------------------------------------------
class _Scores:
    def __init__(self, d: dict):
        self.accuracy, self.all_correct, self.num_videos = d["accuracy"], d["all_correct"], d["num_videos"]


def _flow_steps(results: dict, s: DemoSettings) -> str:
    """Steps the teacher trained: ``flow_steps``, or where ``flow_time_limit`` stopped it."""
    done = results.get("steps", s.flow_steps)
    return str(done) if done >= s.flow_steps else f"{done} (of {s.flow_steps}; time limit {s.flow_time_limit:g} s)"


def write_report(ctx: DemoContext, phases: list[Phase], cfg, total_seconds: float) -> Path:
    from neodragon_jax.eval.report import MarkdownReport, score_table

    s = ctx.settings
    by = {p.name: p for p in phases}
    ev = by["eval"].results
    gen = ev["scores"]["generated"]["accuracy"]
    rep = MarkdownReport(ctx.workdir / REPORT, "neodragon demo: text-to-video trained from scratch on this machine")
    mode = "quick (toy sizes: a smoke test, not a result)" if ctx.quick else "full"
    rep.paragraph(
        f"Mode: **{mode}**. Synthetic captioned videos ({cfg.video.num_frames} frames, {cfg.video.height}x"
        f"{cfg.video.width}, {cfg.video.fps} fps) -> tiny causal VAE -> latents + text features -> tiny MMDiT teacher "
        f"(pyramidal flow matching) -> videos for **held-out prompts** (attribute triples never seen in training) "
        f"with the teacher schedule -> pixel scorer. Command: `{' '.join(['neodragon', 'demo'] + ctx.argv)}`.")
    rows = []
    for attr, target in TARGETS.items():
        acc = gen.get(attr)
        rows.append([f"{attr} accuracy (held-out prompts)", acc, f">= {target}",
                     "-" if acc is None else ("met" if acc >= target else "below")])
    rows.append(["VAE reconstruction PSNR (held-out videos, dB)", ev["psnr"], "", ""])
    rows.append(["VAE reconstruction SSIM (held-out videos)", ev["ssim"], "", ""])
    rows.append(["total wall time of the phases (s)", sum(p.seconds for p in phases), "", ""])
    rep.heading("Headline").table(["figure", "value", "target", ""], rows, "lrrl")

    rep.heading("Phases")
    what = {"data": f"{s.train_videos} training + {s.eval_videos} held-out videos",
            "vae": f"{s.vae_steps} steps, batch {s.vae_batch}, crops {s.vae_frames}x{s.vae_crop}x{s.vae_crop}",
            "latents": f"{by['latents'].results.get('records', '?')} records",
            "flow": f"{_flow_steps(by['flow'].results, s)} steps, batch {s.flow_batch}",
            "samples": f"{by['samples'].results.get('videos', '?')} videos, "
                       f"{by['samples'].results.get('nfe_per_video', '?')} NFE each",
            "eval": "VAE PSNR/SSIM, scorer x3"}
    rep.table(["phase", "work", "wall time (s)", "this run"],
              [[p.name, what.get(p.name, ""), p.seconds, "ran" if p.ran else "reused"] for p in phases], "llrl")
    rep.paragraph(f"This invocation took {total_seconds:.1f} s (phases marked *reused* were finished by an "
                  f"earlier run; their wall time is the time it took then).")

    rep.heading("Scores")
    rep.paragraph("Per-attribute accuracy of the pixel scorer (`neodragon_jax.eval.scorer`) against each held-out "
                  "caption: on the renderer's own videos (the scorer's ceiling), on the VAE's reconstructions of "
                  "them (the ceiling this VAE allows), and on the generated videos.")
    rep.raw(score_table({"renders": _Scores(ev["scores"]["renders"]),
                         "VAE reconstructions": _Scores(ev["scores"]["vae_recon"]),
                         "generated": _Scores(ev["scores"]["generated"])}))
    rep.image(by["eval"].dir / "generated_vs_render.png", "generated_vs_render.png",
              "held-out prompts: render (top) and generated video (bottom)")

    v = by["vae"].results
    rep.heading("VAE")
    tm = v.get("train_metrics", {})
    rep.paragraph(
        f"`vae` stage (`train/vae.py`): {v.get('params', 0):,} parameters, loss = MSE + 0.2 (1 - SSIM) + 1e-6 KL on "
        f"random {s.vae_frames}-frame {s.vae_crop}x{s.vae_crop} crops, AdamW lr {s.vae_lr:g}, `{s.vae_init}` kernel "
        f"init{' with zero-init residual branches' if s.vae_zero_init else ''}. Last training step: "
        + (", ".join(f"{k} {tm[k]:.4g}" for k in ("loss", "psnr", "ssim") if k in tm) or "(resumed complete)")
        + f". Held-out reconstruction (whole clips, posterior mean): PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}.")
    norm = v.get("normalisation", {})
    rep.paragraph("Latent normalisation measured on the trained VAE (used for extraction and generation): "
                  + ", ".join(f"`{k}` = {val:.4f}" for k, val in norm.items()) + ".")
    rep.image(by["eval"].dir / "vae_reconstructions.png", "vae_reconstructions.png",
              "held-out renders and their VAE reconstructions")

    f = by["flow"].results
    ft = f.get("train_metrics", {})
    sm, m = cfg.sampling, cfg.model.mmdit
    rep.heading("Flow teacher")
    rep.paragraph(
        f"`flow` stage: MMDiT {m.num_layers} blocks x {m.num_heads * m.head_dim} wide ({f.get('params', 0):,} parameters), {_flow_steps(f, s)} steps of batch {s.flow_batch}, AdamW lr "
        f"{s.flow_lr:g}. Last step: " + (", ".join(f"{k} {ft[k]:.4g}" for k in ft if k.startswith("loss")) or "-")
        + f". Text features come from the tiny preset's teacher text stack (T5 + CLIP pair) with random, frozen "
        f"weights: the MMDiT learns to read them. Sampling: teacher schedule "
        f"{'-'.join(map(str, sm.first_unit_steps))} (first unit), {'-'.join(map(str, sm.later_unit_steps))} "
        f"(later units), CFG {sm.first_unit_cfg:g} / {sm.later_unit_cfg:g}.")
    base = ev.get("flow_vs_linear") or []
    if base:
        rep.paragraph(
            "The teacher's loss per pyramid stage (mean of the last 10% of steps) beside the best per-patch map "
            "linear in the noisy patch, with coefficients quadratic in the noise level, fitted to the same targets "
            "(`neodragon_jax.eval.flow_baseline`). It sees no text and no neighbouring patch: a teacher that draws "
            "objects from captions must get well below it, and one at or above it has learned a linear filter.")
        rep.table(["stage", "latent", "var(v*)", "per-patch linear baseline", "teacher"],
                  [[r["stage"], "x".join(map(str, r["latent_hw"])), r["target_var"], r["linear_baseline"],
                    "-" if r.get("teacher") is None else r["teacher"]] for r in base], "llrrr")

    rep.heading("Files")
    files = {"data": "train/ and heldout/ video folders (captions.jsonl, scenes.jsonl)",
             "vae": "VAE run: config.json, metrics.jsonl, checkpoints/",
             "latents": "records/*.npz, null_text.npz, manifest.json",
             "flow": "MMDiT run: config.json, metrics.jsonl, checkpoints/",
             "samples": "generated NNN.mp4, NNN_frames.png, NNN.json, captions.jsonl",
             "eval": "DONE.json (all scores, per-video judgements), contact sheets"}
    rep.bullets([f"`{p.name}/`: {files.get(p.name, '')}" for p in phases]
                + ["`text/params.npz`: the frozen text stack's weights", "`demo.json`: settings and resolved config"])
    return rep.write()


# ------------------------------------------------------------------------------------------------- main
def add_arguments(p) -> None:
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"run folder (default {DEFAULT_WORKDIR})")
    p.add_argument("--quick", action="store_true", help="toy sizes through every phase (about a minute; a smoke test)")
    p.add_argument("--config", default="tiny", help="preset name or .toml path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="demo.<field>=value sets a demo size (e.g. demo.flow_steps=3000); anything else is a config "
                        "override (e.g. optim.b1=0.9)")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA compilation cache folder, 'none' to disable (default: as `neodragon train`)")


def run(args) -> int:
    from neodragon_jax.config import ConfigError

    t_start = time.perf_counter()
    argv = (["--workdir", args.workdir] + (["--quick"] if args.quick else [])
            + ([f"--config {args.config}"] if args.config != "tiny" else []) + [f"--set {o}" for o in args.overrides])
    try:
        return _run(args, argv, t_start)
    except DemoError as e:
        print(f"neodragon demo: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"neodragon demo: config error: {e}", file=sys.stderr)
        return 2


def _run(args, argv: list[str], t_start: float) -> int:
    from neodragon_cli.train import enable_compile_cache
    from neodragon_jax.config import load_config, to_dict
    from neodragon_jax.models.text.tokenizers import TextTokenizers
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    settings, config_overrides = parse_settings(args.overrides, args.quick)
    overrides = list(DEMO_OVERRIDES) + (list(QUICK_OVERRIDES) if args.quick else []) + config_overrides
    cfg = load_config(args.config, overrides)
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compile_cache(args.compile_cache)
    mesh = _mesh(settings)
    ctx = DemoContext(workdir, settings, cfg, mesh, bool(args.quick), argv)
    _say(f"neodragon demo ({'quick' if ctx.quick else 'full'}) in {workdir}: config {cfg.name!r}, "
         f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s)")

    phases: list[Phase] = []

    def note(ph: Phase) -> Phase:
        phases.append(ph)
        if not ph.ran:
            _say(f"[{ph.name}] done already (built in {_fmt_time(ph.seconds)}) - reusing {ph.dir}")
        else:
            _say(f"[{ph.name}] finished in {_fmt_time(ph.seconds)}")
        return ph

    data = note(phase_data(ctx))
    vae_ph, vae = phase_vae(ctx, data)
    note(vae_ph)
    run_cfg = _with_normalisation(cfg, vae_ph.results["normalisation"])
    text = text_stack(run_cfg, workdir / "text" / "params.npz", settings.text_seed)
    latents = note(phase_latents(ctx, data, vae_ph, vae, text, run_cfg))
    flow, mmdit = phase_flow(ctx, latents, run_cfg)
    note(flow)
    pipe = TextToVideoPipeline(run_cfg, TextTokenizers.for_config(run_cfg.model.text), text, mmdit, vae,
                               source=f"neodragon demo {workdir} (trained VAE + flow teacher, frozen random text)")
    samples = note(phase_samples(ctx, data, flow, pipe))
    ev = note(phase_eval(ctx, data, samples, vae, run_cfg))

    total = time.perf_counter() - t_start
    _write_json(workdir / "demo.json", {"settings": dataclasses.asdict(settings), "quick": ctx.quick,
                                        "config": to_dict(run_cfg), "argv": argv})
    path = write_report(ctx, phases, run_cfg, total)
    acc = ev.results["scores"]["generated"]["accuracy"]
    reused = [p.name for p in phases if not p.ran]
    _say("")
    _say("held-out prompts, teacher schedule: " + ", ".join(f"{a} {acc[a]:.3f}" for a in acc))
    _say(f"VAE reconstruction on held-out videos: PSNR {ev.results['psnr']:.2f} dB, SSIM {ev.results['ssim']:.3f}")
    _say("phase wall times: " + ", ".join(f"{p.name} {p.seconds:.1f}s" + ("" if p.ran else " (reused)")
                                          for p in phases))
    if reused and len(reused) == len(phases):
        _say(f"every phase was already complete: nothing rebuilt, this run took {total:.1f} s")
    _say(f"report: {path}")
    return 0
