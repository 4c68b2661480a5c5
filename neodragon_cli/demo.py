"""`neodragon demo`: the whole job on a CPU - data, VAE, text stack, latents, flow teacher, generation, scoring,
report - as a recipe (``train.recipe``) of seven phases.

Phases, each in its own folder under ``--workdir`` (default ``runs/demo``):

``data``      job: synthetic captioned videos over the TRAIN (colour, shape, motion) triples, plus held-out
              videos whose triples never occur in training (their captions are the evaluation prompts);
``vae``       the ``vae`` stage: the preset's causal VAE (encoder + native decoder) trained on the training
              videos; then (``after``) the latent shift / scale of the trained VAE, the DiT's normalisation;
``text``      job: the frozen text stack (the preset's random-init teacher T5 + CLIP pair), saved once;
``latents``   job: records of VAE latents (normalised) + text features (``neodragon_jax.data.extract``);
``flow``      the ``flow`` stage: the preset's MMDiT teacher trained with pyramidal flow matching on the records;
``samples``   job: one video per held-out prompt with the config's sampling schedule (lossless mp4 for
              scoring, a GIF and a labelled contact sheet to look at), resumed video by video;
``eval``      job: VAE reconstruction PSNR / SSIM on the held-out videos; the strict pixel scorer, each
              accuracy beside its chance level, on the renders, the VAE reconstructions and the generated videos;
``report.md`` with PNG contact sheets (every row labelled with its prompt).

Each phase's key is a digest of its resolved config, settings and inputs' keys (``train.recipe``): a finished
phase with the same key is reused, an interrupted one resumes (training from its last checkpoint, generation
from the last finished video), and a changed one is rebuilt together with the phases after it that read it,
after a line naming the differing keys. ``--quick`` runs every phase at toy sizes (the CI check). Demo
settings are ``--set demo.<field>=value`` (:class:`DemoSettings`); any other ``--set`` is a config override
(:data:`DEMO_KEYS` lists the config keys the demo sets itself from its settings: those are refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = "runs/demo"
DEFAULT_CONFIG = "tiny-teacher"
REPORT = "report.md"
#: Targets of this from-scratch demo (held-out prompts, generated videos, strict scorer).
TARGETS = {"colour": 0.6, "motion": 0.4}
#: The shipped release the report compares with (its recorded scores), when this installation has it.
SHIPPED_RELEASE = "tiny-teacher"
PHASES = ("data", "vae", "text", "latents", "flow", "samples", "eval")
TEXT_PARAMS = "params.npz"


class DemoError(Exception):
    """A user-facing problem (bad setting, a config key the demo sets itself): one line, exit status 2."""


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes and recipes of the demo (``--set demo.<field>=value``), all in this one place. :data:`QUICK`
    goes through every phase at toy sizes."""

    # data
    train_videos: int = 3000
    eval_videos: int = 48          # held-out prompts: generated, scored; their renders measure the VAE
    two_object_prob: float = 0.0   # held-out prompts have one object; two-object scenes only cost capacity
    data_seed: int = 0
    eval_seed: int = 1
    # vae (stage settings: stages.vae.*)
    vae_steps: int = 800
    vae_batch: int = 32
    # Training clip: vae_frames x whole frames (vae_crop=0) or vae_crop x vae_crop crops. The tiny teacher's
    # VAE does not compress time, so single frames train it; with temporal compression
    # (``model.vae.causal.temporal_down``) use whole clips (1 + 8k frames).
    vae_frames: int = 1
    vae_crop: int = 0
    vae_lr: float = 4e-3
    vae_chroma: float = 1.0        # stages.vae.chroma_weight: MSE of RGB minus its per-pixel channel mean
    vae_kl: float = 1e-3           # stages.vae.kl_weight
    vae_init: str = "inflated"     # stages.vae.kernel_init: "inflated", "lecun" or "official"
    vae_zero_init: bool = True     # stages.vae.zero_init_residual: residual branches start at zero
    # flow
    flow_steps: int = 2000
    flow_batch: int = 16
    flow_lr: float = 1e-3
    flow_warmup: int = 100
    flow_ema: float = 0.995        # > 0: keep an EMA of the MMDiT and generate with it
    # > 0: the flow phase stops after this many seconds (compilation included) at the step it reached,
    # checkpointed, and the demo goes on with that teacher; for a time-boxed machine (use a schedule that
    # does not depend on the step count, e.g. demo.flow_decay_steps, since the run may end early).
    flow_time_limit: float = 0.0
    flow_decay_steps: int = 0      # cosine length after warmup; 0 = until flow_steps (see flow_time_limit)
    # the rest
    extract_batch: int = 8
    text_seed: int = 0
    devices: int = 0               # devices to train on; 0 = one on CPU (XLA uses every core), all otherwise
    sheet_videos: int = 8          # rows of each contact sheet in the report

    @classmethod
    def fields(cls) -> dict[str, type]:
        return setting_types(cls)


QUICK = DemoSettings(train_videos=48, eval_videos=4, vae_steps=2, vae_batch=4, flow_steps=2, flow_batch=4,
                     flow_warmup=0, extract_batch=4, sheet_videos=4)

#: Config overrides the demo applies on top of --config (before --set): what is demo-specific and not in the
#: ``tiny-teacher`` preset (its shapes are the demo's). Both training phases use AdamW with b2 = 0.99.
DEMO_OVERRIDES = ("optim.b2=0.99",)
#: Extra overrides of --quick (short compiles): 5-frame clips (the first frame + one 4-frame unit), a 3-block
#: VAE (still 4x spatial, no time compression), a 1-block MMDiT trained on one pyramid layout.
QUICK_OVERRIDES = ("video.num_frames=5", "model.vae.causal.block_out_channels=[8,8,8]",
                   "model.vae.causal.spatial_down=[true,true,false]",
                   "model.vae.causal.temporal_down=[false,false,false]",
                   "model.mmdit.num_layers=1", "train.pyramid_units=[1]")

#: Every config key the demo's phases set themselves, and from what (a phase's ``configure``; checked by
#: :func:`_checked` whenever a phase is configured). A ``--set`` of one of them would be overwritten, so it is
#: refused, naming the demo setting to use instead.
DEMO_KEYS = {
    "train.steps": "demo.vae_steps (vae) and demo.flow_steps (flow)",
    "train.global_batch": "demo.vae_batch (vae) and demo.flow_batch (flow)",
    "train.time_limit_s": "demo.flow_time_limit (flow; none for vae)",
    "train.stage": "the phase (vae, flow)",
    "train.output_dir": "the phase's folder under --workdir",
    "train.log_every": "the demo (every 10 steps)",
    "train.tensorboard": "the demo (off)",
    "optim.lr": "demo.vae_lr (vae) and demo.flow_lr (flow)",
    "optim.warmup_steps": "demo.flow_warmup (flow; vae: a tenth of demo.vae_steps, at most 50)",
    "optim.decay_steps": "demo.flow_decay_steps (flow; vae: 0, the whole run)",
    "optim.end_lr_ratio": "the demo (vae 0.1, flow 0.05)",
    "optim.ema_decay": "demo.flow_ema (flow; vae: none)",
    "data.source": "the demo (vae: the data phase's videos; flow: the latents phase's records)",
    "data.path": "the demo (vae: <workdir>/data/train; flow: <workdir>/latents/records)",
    "data.seed": "demo.data_seed",
    "data.in_memory": "the demo (records of at most 4 GB are read into memory once)",
    "stages.vae.clip_frames": "demo.vae_frames",
    "stages.vae.crop": "demo.vae_crop",
    "stages.vae.chroma_weight": "demo.vae_chroma",
    "stages.vae.kl_weight": "demo.vae_kl",
    "stages.vae.kernel_init": "demo.vae_init",
    "stages.vae.zero_init_residual": "demo.vae_zero_init",
    "checkpoint.every_steps": "the demo (every 250 steps, or 20 checkpoints a run)",
    "checkpoint.keep_latest": "the demo (the latest one; checkpoint.keep_every keeps more)",
    "checkpoint.resume": "the recipe runner (an interrupted phase resumes)",
    "checkpoint.directory": "the recipe runner (<workdir>/<phase>/checkpoints)",
    "mesh.data": "demo.devices",
    "mesh.fsdp": "demo.devices",
    "mesh.tensor": "demo.devices",
    "model.vae.causal.image_shift": "the vae phase's measured latent normalisation",
    "model.vae.causal.image_scale": "the vae phase's measured latent normalisation",
    "model.vae.causal.video_shift": "the vae phase's measured latent normalisation",
    "model.vae.causal.video_scale": "the vae phase's measured latent normalisation",
}


def setting_types(cls) -> dict[str, type]:
    """``{field: type of its default}`` of a settings dataclass (the demo's, the recipe's)."""
    return {f.name: type(f.default) for f in dataclasses.fields(cls)}


def typed_setting(key: str, value, types: dict[str, type], prefix: str, error) -> tuple[str, object]:
    """``(field, value)`` of a ``--set PREFIX.field=value`` item, checked against the field's type (an int is
    taken for a float; a bare word for a str); ``error(message)`` for an unknown field or a wrong type."""
    name = key[len(prefix) + 1:]
    if name not in types:
        raise error(f"unknown {prefix} setting {key!r}; valid: {', '.join(f'{prefix}.{k}' for k in types)}")
    tp = types[name]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise error(f"{key}={value!r}: expected {tp.__name__}")
    return name, value


def _under(key: str, prefixes) -> str | None:
    """The prefix of ``prefixes`` that ``key`` is (or is under), else None."""
    for p in prefixes:
        if key == p or key.startswith(p + "."):
            return p
    return None


def parse_settings(overrides: list[str], quick: bool) -> tuple[DemoSettings, list[str]]:
    """Split ``--set`` items into demo settings (``demo.*``) and config overrides; refuse config keys the
    demo sets itself (:data:`DEMO_KEYS`)."""
    from neodragon_jax.config import parse_override

    base = QUICK if quick else DemoSettings()
    types = DemoSettings.fields()
    changes, config_overrides = {}, []
    for item in overrides:
        for o in item.split():
            key, value = parse_override(o)
            if not key.startswith("demo."):
                owner = _under(key, DEMO_KEYS) or next((k for k in DEMO_KEYS if k.startswith(key + ".")), None)
                if owner is not None:
                    raise DemoError(f"--set {key}: the demo sets {owner} itself, from {DEMO_KEYS[owner]}; "
                                    f"set that instead (neodragon_cli/demo.py:DEMO_KEYS)")
                config_overrides.append(o)
                continue
            name, changes[name] = typed_setting(key, value, types, "demo", DemoError)
    s = dataclasses.replace(base, **changes)
    for name in ("train_videos", "vae_steps", "vae_batch", "vae_frames", "flow_steps", "flow_batch",
                 "extract_batch", "sheet_videos"):
        if getattr(s, name) < 1:
            raise DemoError(f"demo.{name} must be >= 1, got {getattr(s, name)}")
    if s.eval_videos < 2:
        raise DemoError(f"demo.eval_videos must be >= 2 (the chance level deranges their captions), "
                        f"got {s.eval_videos}")
    from train.vae import KERNEL_INITS

    if s.vae_init not in KERNEL_INITS:
        raise DemoError(f"demo.vae_init must be one of {', '.join(KERNEL_INITS)}, got {s.vae_init!r}")
    for name in ("vae_crop", "vae_chroma", "vae_kl", "flow_warmup", "devices"):
        if getattr(s, name) < 0:
            raise DemoError(f"demo.{name} must be >= 0, got {getattr(s, name)}")
    if s.flow_decay_steps < 0:
        raise DemoError(f"demo.flow_decay_steps must be >= 0 (0 = until demo.flow_steps), got {s.flow_decay_steps}")
    if s.flow_time_limit < 0:
        raise DemoError(f"demo.flow_time_limit must be >= 0 seconds (0 = none), got {s.flow_time_limit}")
    if not 0.0 <= s.flow_ema < 1.0:
        raise DemoError(f"demo.flow_ema must be in [0, 1) (0 = no EMA), got {s.flow_ema}")
    if not 0.0 <= s.two_object_prob <= 1.0:
        raise DemoError(f"demo.two_object_prob must be in [0, 1], got {s.two_object_prob}")
    return s, config_overrides


def _check_vae_clip(cfg, s: DemoSettings) -> None:
    from train.vae import _check_clip_geometry

    try:
        _check_clip_geometry(cfg, s.vae_frames, s.vae_crop or None)
    except ValueError as e:
        raise DemoError(f"demo.vae_frames={s.vae_frames}, demo.vae_crop={s.vae_crop}: {e}") from None


# ------------------------------------------------------------------------------------------- progress
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
        self.inode = metrics.stat().st_ino if metrics.is_file() else None
        self.steps_seen = 0
        self.step_seconds = 0.0  # summed host step times: the rate excludes compiling and checkpoint saves
        self.last: dict | None = None
        self.printed: str | None = None

    def _read(self) -> None:
        try:
            with open(self.path) as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    # A resumed run rewrites metrics.jsonl without the steps it replays (and a line torn by
                    # a kill): read the new file from its start.
                    self.inode, self.offset = st.st_ino, 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        lines = chunk.split("\n")
        self.offset += len(chunk) - len(lines[-1])  # leave a partly written line for the next read
        for line in lines[:-1]:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # progress lines must never stop training: skip what is not a record
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
        at = 0.0
        while not self.stop_event.wait(self.every):
            self._read()
            line = self.line()
            # A new step, or a minute without one (a checkpoint save, a slow compile of the last layouts).
            if line and (line != self.printed or time.monotonic() - at > 60.0):
                _say(line)
                self.printed, at = line, time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self._read()
        line = self.line()
        if line and line != self.printed:
            _say(line)


#: Metrics each training phase's progress lines show.
PROGRESS_KEYS = {"vae": ("loss", "psnr", "ssim"), "flow": ("loss", "loss/stage0", "loss/stage1", "loss/stage2")}


def _bar(items, desc: str, unit: str = "video"):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stdout)


# ------------------------------------------------------------------------------------------ the demo
@dataclasses.dataclass
class DemoRun:
    """One invocation: settings, base config (preset + demo overrides + --set), mesh, and the trained modules
    restored so far (by phase name: within one invocation every phase has one key)."""

    workdir: Path
    settings: DemoSettings
    cfg: Any
    mesh: Any
    quick: bool
    argv: list[str]
    modules_: dict = dataclasses.field(default_factory=dict)

    @property
    def devices(self) -> int:
        return int(self.mesh.devices.size)

    def modules(self, source) -> dict:
        """The trained modules of a training phase (its record, or its context in ``after``; EMA weights
        where the phase kept them)."""
        from train.recipe import restore_modules

        if source.name not in self.modules_:
            self.modules_[source.name] = restore_modules(source, self.mesh)
        return self.modules_[source.name]

    @contextlib.contextmanager
    def progress(self, ctx):
        """Around each training run (``run_recipe(around_train=...)``): progress lines with rate and ETA."""
        _say(f"[{ctx.name}] building the models and compiling the train step ...")
        p = TrainProgress(ctx.name, ctx.dir / "metrics.jsonl", ctx.cfg.train.steps,
                          PROGRESS_KEYS.get(ctx.name, ("loss",)), every=2.0 if self.quick else 10.0)
        p.start()
        try:
            yield
        finally:
            p.stop()


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


def _checkpoint_every(steps: int) -> int:
    """Every 250 steps, or 20 checkpoints a run for long ones (an accelerator runs tens of steps a second)."""
    return max(1, min(steps, max(250, steps // 20)))


def _flat_config(cfg, stages) -> dict:
    from neodragon_jax.config import to_dict
    from train.recipe import flatten

    d = to_dict(cfg)
    d["stages"] = {n: dataclasses.asdict(cfg.stages.get_settings(n)) for n in stages}
    return flatten(d)


def _checked(name: str, configure):
    """``configure`` of phase ``name``, checked to set no config key that :data:`DEMO_KEYS` does not list."""

    def wrapped(base, inputs, settings):
        cfg = configure(base, inputs, settings)
        stages = sorted(set(base.stages) | set(cfg.stages))
        a, b = _flat_config(base, stages), _flat_config(cfg, stages)
        unlisted = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and _under(k, DEMO_KEYS) is None]
        if unlisted:
            raise AssertionError(f"the demo's {name} phase sets {unlisted}: list them in DEMO_KEYS")
        return cfg

    return wrapped


def _train_layout(base, run: DemoRun, *, steps: int, batch: int, time_limit_s: float = 0.0):
    """The training phases' run layout: steps, batch, logging, checkpoints, mesh (DEMO_KEYS)."""
    return dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, steps=steps, global_batch=batch, log_every=10, tensorboard=False,
                                  time_limit_s=time_limit_s),
        checkpoint=dataclasses.replace(base.checkpoint, every_steps=_checkpoint_every(steps), keep_latest=1),
        mesh=dataclasses.replace(base.mesh, data=1, fsdp=run.devices, tensor=1),
    )


def _with_normalisation(cfg, norm: dict):
    causal = dataclasses.replace(cfg.model.vae.causal, **norm)
    vae = dataclasses.replace(cfg.model.vae, causal=causal)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vae=vae))


def _normalised(base, inputs, settings):
    """The base config with the vae phase's measured latent normalisation (``model.vae.causal.*_shift/scale``)."""
    return _with_normalisation(base, inputs["vae"].results["normalisation"])


def _pick(s: DemoSettings, *names: str) -> dict:
    return {n: getattr(s, n) for n in names}


def _num_params(module) -> int:
    import jax
    from flax import nnx

    return int(sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _load_videos(folder: Path, cfg, limit: int | None = None):
    import numpy as np

    from neodragon_jax.data.video_folder import VideoFolder

    vf = VideoFolder.from_config(folder, cfg)
    items = [it for it in (vf.get(i) for i in range(min(len(vf), limit or len(vf)))) if it is not None]
    if not items:
        raise DemoError(f"no readable video in {folder}")
    return np.stack([it["video"] for it in items]), [it["text"] for it in items]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# -- phase: data ----------------------------------------------------------------------------------------
def data_job(ctx) -> dict:
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.data.synthetic import write_dataset

    s, v = ctx.settings, ctx.cfg.video
    split = split_combinations()
    _say(f"[data] rendering {s['train_videos']} training videos ({len(split.train)} training triples) and "
         f"{s['eval_videos']} held-out videos ({len(split.held_out)} held-out triples)")
    common = dict(height=v.height, width=v.width, num_frames=v.num_frames, fps=v.fps)
    write_dataset(ctx.dir / "train", n=s["train_videos"], seed=s["data_seed"], split=split,
                  two_object_prob=s["two_object_prob"], **common)
    write_dataset(ctx.dir / "heldout", n=s["eval_videos"], seed=s["eval_seed"], held_out=True, **common)
    return {"train_triples": len(split.train), "heldout_triples": len(split.held_out)}


# -- the frozen text stack ----------------------------------------------------------------------------------
def _key_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def text_stack(cfg, path: Path, seed: int = 0, *, save: bool = False):
    """The frozen (random-init) text conditioner of ``cfg.model.text``. ``save``: initialise it from ``seed``
    and write its weights to ``path``; else read them from ``path``, so extraction and generation always see
    the weights the text phase saved."""
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
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{_key_name(p): np.asarray(v) for p, v in leaves})
        os.replace(tmp, path)
        return model
    with np.load(path) as z:
        names = [_key_name(p) for p, _ in leaves]
        missing = [n for n in names if n not in z.files]
        if missing or len(z.files) != len(names):
            raise DemoError(f"{path} does not fit model.text of this config (missing {missing[:3]}...); "
                            f"delete {path.parent} to rebuild it")
        new = [jnp.asarray(z[n]) for n in names]
    pure = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), new)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def text_job(ctx) -> dict:
    _say("[text] initialising the frozen text stack (random weights) and saving it")
    model = text_stack(ctx.cfg, ctx.dir / TEXT_PARAMS, ctx.settings["text_seed"], save=True)
    return {"params": _num_params(model)}


# -- phase: flow (records) -------------------------------------------------------------------------------
#: Records up to this size are read into host memory once: on an accelerator, reading a batch's npz files
#: each step (about 1 ms per record on this machine) would otherwise bound the step rate.
IN_MEMORY_RECORDS_BYTES = 4 << 30


def _records_fit_in_memory(records: Path) -> bool:
    return records.is_dir() and sum(f.stat().st_size for f in records.glob("*.npz")) <= IN_MEMORY_RECORDS_BYTES


# -- the recipe -------------------------------------------------------------------------------------------
def build_phases(run: DemoRun) -> list:
    """The demo as ``train.recipe`` phases. Demo settings reach the config only through each phase's
    ``configure`` (the keys are listed in :data:`DEMO_KEYS`); the phases' settings are the demo settings each
    one reads, so a changed setting names itself in the rebuild line."""
    from train.recipe import JobPhase, TrainPhase

    s = run.settings

    # -- vae: the stage on the data phase's training videos; after: the latent normalisation
    def vae_configure(base, inputs, st):
        cfg = _train_layout(base, run, steps=st["vae_steps"], batch=st["vae_batch"])
        vs = dataclasses.replace(base.stages.get_settings("vae"), clip_frames=st["vae_frames"], crop=st["vae_crop"],
                                 chroma_weight=st["vae_chroma"], kl_weight=st["vae_kl"], kernel_init=st["vae_init"],
                                 zero_init_residual=st["vae_zero_init"])
        return dataclasses.replace(
            cfg,
            optim=dataclasses.replace(base.optim, lr=st["vae_lr"], warmup_steps=min(50, st["vae_steps"] // 10),
                                      decay_steps=0, end_lr_ratio=0.1, ema_decay=0.0),
            data=dataclasses.replace(base.data, source="synthetic", path=str(inputs["data"].dir / "train"),
                                     seed=st["data_seed"]),
            stages=cfg.stages.with_settings("vae", vs))

    def vae_after(ctx, result) -> dict:
        from train.vae import latent_normalisation

        vae = run.modules(ctx)["vae"]
        _say("[vae] measuring the latent normalisation of the trained VAE")
        videos, _ = _load_videos(ctx.inputs["data"].dir / "train", ctx.cfg, limit=64)
        norm = latent_normalisation(vae, videos, batch_size=4)
        _say("[vae] latent normalisation: " + ", ".join(f"{k} {v:.4f}" for k, v in norm.items()))
        return {"normalisation": norm, "params": _num_params(vae)}

    # -- latents: extraction with the trained VAE (normalised) and the saved text stack
    def latents_job(ctx) -> dict:
        from neodragon_jax.data.extract import extract

        st = ctx.settings
        vae = run.modules(ctx.inputs["vae"])["vae"]
        text = text_stack(ctx.cfg, ctx.inputs["text"].dir / TEXT_PARAMS)
        train = ctx.inputs["data"].dir / "train"
        _say(f"[latents] encoding the videos of {train} with the trained VAE and the frozen text stack")
        res = extract(train, ctx.dir, ctx.cfg, vae=vae, text=text, seed=st["data_seed"],
                      batch_size=st["extract_batch"], null_in_records=True, overwrite=not ctx.resumed)
        if res.done == 0:
            raise DemoError(f"no record could be extracted from {train}")
        return {"records": res.done, "skipped": res.skipped}

    # -- flow: the stage on the latents phase's records
    def flow_configure(base, inputs, st):
        records = inputs["latents"].dir / "records"
        cfg = _train_layout(base, run, steps=st["flow_steps"], batch=st["flow_batch"],
                            time_limit_s=st["flow_time_limit"])
        return dataclasses.replace(
            cfg,
            optim=dataclasses.replace(base.optim, lr=st["flow_lr"],
                                      warmup_steps=min(st["flow_warmup"], st["flow_steps"] // 2),
                                      decay_steps=st["flow_decay_steps"], end_lr_ratio=0.05, ema_decay=st["flow_ema"]),
            data=dataclasses.replace(base.data, source="records", path=str(records), seed=st["data_seed"],
                                     in_memory=_records_fit_in_memory(records)))

    def flow_after(ctx, result) -> dict:
        return {"params": _num_params(run.modules(ctx)["mmdit"])}

    # -- samples: one video per held-out prompt, resumed video by video
    def samples_job(ctx) -> dict:
        from neodragon_jax.data.synthetic import read_scenes
        from neodragon_jax.data.video_io import write_gif, write_mp4, write_png
        from neodragon_jax.eval.heldout import heldout_prompts
        from neodragon_jax.eval.report import labelled_sheet
        from neodragon_jax.models.text.tokenizers import TextTokenizers
        from neodragon_jax.pipelines.text_to_video import GenerationRequest, TextToVideoPipeline

        cfg = ctx.cfg
        rows = read_scenes(ctx.inputs["data"].dir / "heldout")
        # The evaluation prompts every report of this project scores (a release's record, a distillation
        # report); the held-out renders are drawn from the same items, so each prompt has its render.
        prompts = heldout_prompts(len(rows), seed=ctx.settings["eval_seed"])
        if prompts != [r["text"] for r in rows]:
            raise DemoError(f"the held-out videos in {ctx.inputs['data'].dir / 'heldout'} do not match "
                            f"neodragon_jax.eval.heldout.heldout_prompts; delete {ctx.inputs['data'].dir} to rebuild")
        done = [i for i in range(len(rows)) if ctx.resumed and (ctx.dir / f"{i:03d}.json").is_file()]
        todo = [i for i in range(len(rows)) if i not in set(done)]
        if done:
            _say(f"[samples] {len(done)} of {len(rows)} videos already generated, continuing")
        sm = cfg.sampling
        _say(f"[samples] schedule {'-'.join(map(str, sm.first_unit_steps))} (first unit), "
             f"{'-'.join(map(str, sm.later_unit_steps))} (later units), "
             f"CFG {sm.first_unit_cfg:g} / {sm.later_unit_cfg:g}")
        if todo:
            pipe = TextToVideoPipeline(cfg, TextTokenizers.for_config(cfg.model.text),
                                       text_stack(cfg, ctx.inputs["text"].dir / TEXT_PARAMS),
                                       run.modules(ctx.inputs["flow"])["mmdit"], run.modules(ctx.inputs["vae"])["vae"],
                                       source=f"neodragon demo {run.workdir} (trained VAE + flow teacher, frozen "
                                              f"random text)")
            bar = _bar(todo, "[samples] generating")
            for i in bar:
                row = rows[i]
                res = pipe.generate(GenerationRequest(prompt=prompts[i], seed=i))
                stem = ctx.dir / f"{i:03d}"
                write_mp4(res.frames, stem.with_suffix(".mp4"), fps=cfg.video.fps, lossless=True)  # scored
                write_gif(res.frames, stem.with_suffix(".gif"), fps=cfg.video.fps)  # to look at
                write_png(labelled_sheet([res.frames], [res.prompt], scale=3),
                          stem.with_name(stem.name + "_frames.png"))
                _write_json(stem.with_suffix(".json"), {  # last: the video is complete
                    "prompt": res.prompt, "seed": res.seed, "schedule": res.schedule, "nfe": res.nfe,
                    "timings_s": res.timings, "source_video": row["video"], "weights": pipe.source})
            bar.close()
        (ctx.dir / "captions.jsonl").write_text(
            "".join(json.dumps({"video": f"{i:03d}.mp4", "text": t}) + "\n" for i, t in enumerate(prompts)))
        nfe = json.loads((ctx.dir / "000.json").read_text())["nfe"]
        return {"videos": len(rows), "nfe_per_video": nfe}

    # -- eval: VAE PSNR / SSIM, the strict scorer with chance levels, contact sheets, the linear baseline
    def eval_job(ctx) -> dict:
        import numpy as np

        from neodragon_jax.data.video_io import read_video, to_uint8_frames, write_png
        from neodragon_jax.eval.report import labelled_sheet
        from neodragon_jax.eval.scorer import chance_level, score_pairs
        from train.vae import reconstruct

        data, samples = ctx.inputs["data"], ctx.inputs["samples"]
        vae = run.modules(ctx.inputs["vae"])["vae"]
        videos, texts = _load_videos(data.dir / "heldout", ctx.cfg)
        _say(f"[eval] reconstructing {len(videos)} held-out videos with the trained VAE")
        rec, psnr, ssim = reconstruct(vae, videos, batch_size=4)
        renders = [to_uint8_frames(v) for v in videos]
        recons = [to_uint8_frames(r) for r in rec]
        gen = [read_video(samples.dir / f"{i:03d}.mp4")[0] for i in range(len(texts))]
        scores, reports = {}, {}
        for name, vids in (("renders", renders), ("vae_recon", recons), ("generated", gen)):
            reports[name] = score_pairs(_bar(list(zip(vids, texts)), f"[eval] scoring {name}"))
            chance = chance_level([v.analysis for v in reports[name].videos], texts, seed=ctx.settings["data_seed"])
            scores[name] = dict(reports[name].to_dict(), chance=chance)
        n = min(ctx.settings["sheet_videos"], len(texts))

        def inter(a, b, la, lb):  # rows a0, b0, a1, b1, ...
            return [x for pair in zip(a, b) for x in pair], [x for pair in zip(la, lb) for x in pair]

        v1, l1 = inter(renders[:n], recons[:n], [f"render: {t}" for t in texts[:n]],
                       [f"VAE reconstruction ({p:.1f} dB): {t}" for p, t in zip(psnr[:n], texts[:n])])
        write_png(labelled_sheet(v1, l1, scale=3), ctx.dir / "vae_reconstructions.png")
        v2, l2 = inter(renders[:n], gen[:n], [f"render: {t}" for t in texts[:n]],
                       [f"generated: {t}" for t in texts[:n]])
        write_png(labelled_sheet(v2, l2, scale=3), ctx.dir / "generated_vs_render.png")
        per_video = [{"prompt": texts[i], "psnr_recon": float(psnr[i]),
                      "judgements": {a: [bool(x) for x in v] for a, v in sc.judgements.items()}}
                     for i, sc in enumerate(reports["generated"].videos)]
        baseline = _flow_vs_linear(ctx.inputs["latents"].dir, ctx.inputs["flow"], ctx.settings["data_seed"])
        return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_per_video": [float(p) for p in psnr],
                "scores": scores, "per_video": per_video, "flow_vs_linear": baseline}

    return [
        JobPhase("data", data_job, uses=("video",),
                 settings=_pick(s, "train_videos", "eval_videos", "two_object_prob", "data_seed", "eval_seed")),
        TrainPhase("vae", "vae", inputs=("data",), configure=_checked("vae", vae_configure), after=vae_after,
                   settings=_pick(s, "vae_steps", "vae_batch", "vae_frames", "vae_crop", "vae_lr", "vae_chroma",
                                  "vae_kl", "vae_init", "vae_zero_init", "data_seed")),
        JobPhase("text", text_job, uses=("model.text", "precision"), settings=_pick(s, "text_seed")),
        JobPhase("latents", latents_job, inputs=("data", "vae", "text"), configure=_checked("latents", _normalised),
                 uses=("model.text", "model.vae", "video", "precision"),
                 settings=_pick(s, "data_seed", "extract_batch")),
        TrainPhase("flow", "flow", inputs=("latents",), configure=_checked("flow", flow_configure), after=flow_after,
                   settings=_pick(s, "flow_steps", "flow_batch", "flow_lr", "flow_warmup", "flow_ema",
                                  "flow_time_limit", "flow_decay_steps", "data_seed")),
        JobPhase("samples", samples_job, inputs=("data", "vae", "text", "flow"),
                 configure=_checked("samples", _normalised), uses=("sampling", "video"),
                 settings=_pick(s, "eval_seed")),
        JobPhase("eval", eval_job, inputs=("data", "vae", "latents", "flow", "samples"),
                 configure=_checked("eval", _normalised), uses=("sampling", "video"),
                 settings=_pick(s, "sheet_videos", "data_seed")),
    ]


def _flow_vs_linear(latents_dir: Path, flow, seed: int) -> list[dict]:
    """Per pyramid stage: the teacher's training loss (last 10% of steps) beside the loss of a per-patch linear
    denoiser on the same targets (``neodragon_jax.eval.flow_baseline``), on up to 400 latent records."""
    from neodragon_jax.eval.flow_baseline import teacher_vs_baseline
    from neodragon_jax.pyramid.scheduler import make_schedule

    _say("[eval] per-patch linear baseline of the flow targets")
    try:
        rows, _ = teacher_vs_baseline(latents_dir / "records", flow.dir / "metrics.jsonl",
                                      make_schedule(flow.cfg.pyramid), flow.cfg.model.mmdit.patch_size, seed=seed)
    except ValueError as e:  # too few patches to fit (a toy run)
        _say(f"[eval] no linear baseline: {e}")
        return []
    return rows


# -- report -------------------------------------------------------------------------------------------------
def _flow_steps(results: dict, s: DemoSettings) -> str:
    """Steps the teacher trained: ``flow_steps``, or where ``flow_time_limit`` stopped it."""
    done = results.get("end_step", results.get("steps", s.flow_steps))
    return str(done) if done >= s.flow_steps else f"{done} (of {s.flow_steps}; time limit {s.flow_time_limit:g} s)"


def shipped_scores(name: str = SHIPPED_RELEASE, root: Path | None = None) -> dict | None:
    """``{schedule: {"accuracy": {...}, "chance": {...}, "videos": n, ...}}`` recorded with the shipped release
    ``name`` (``neodragon_jax.releases``; ``root``: another releases folder), or None when this installation
    does not ship it or its record cannot be read."""
    from neodragon_jax.releases import ReleaseError, get_release

    try:
        scores = get_release(name, root=root).record.get("scores") or {}
    except ReleaseError:
        return None
    return {k: v for k, v in scores.items() if isinstance(v, dict)} if isinstance(scores, dict) else {}


def _shipped_cell(shipped: dict | None, attr: str) -> str:
    if shipped is None:
        return "not shipped in this installation"
    parts = []
    for schedule, sc in shipped.items():
        acc, chance = (sc or {}).get("accuracy", {}), (sc or {}).get("chance", {})
        if attr in acc:
            n = f", {sc['videos']} prompts" if "videos" in sc else ""
            parts.append(f"{acc[attr]:.3f}" + (f" (chance {chance[attr]:.3f})" if attr in chance else "")
                         + f" [{schedule}{n}]")
    return "; ".join(parts) or "no recorded score"


def chance_table(scores: dict[str, dict], names: dict[str, str]) -> str:
    """Per-attribute accuracy of each score set (``names``: key -> column) with its chance level beside it."""
    from neodragon_jax.eval.report import markdown_table
    from neodragon_jax.eval.scorer import ATTRIBUTES

    attrs = [a for a in ATTRIBUTES if any(a in scores[k]["accuracy"] for k in names)]
    header = ["attribute"]
    for col in names.values():
        header += [col, "chance"]
    rows = [[a] + [x for k in names for x in (scores[k]["accuracy"].get(a), scores[k].get("chance", {}).get(a))]
            for a in attrs]
    rows.append(["all correct"] + [x for k in names for x in (scores[k]["all_correct"], None)])
    rows.append(["videos"] + [x for k in names for x in (scores[k]["num_videos"], None)])
    return markdown_table(header, rows)


def write_report(run: DemoRun, records: dict, total_seconds: float) -> Path:
    from neodragon_jax.eval.report import MarkdownReport

    s = run.settings
    cfg = records["samples"].cfg  # the base config with the measured latent normalisation
    ev = records["eval"].results
    gen = ev["scores"]["generated"]
    shipped = shipped_scores()
    rep = MarkdownReport(run.workdir / REPORT, "neodragon demo: text-to-video trained from scratch on this machine")
    mode = "quick (toy sizes: a smoke test, not a result)" if run.quick else "full"
    sm = cfg.sampling
    schedule = (f"{'-'.join(map(str, sm.first_unit_steps))} / {'-'.join(map(str, sm.later_unit_steps))}, "
                f"CFG {sm.first_unit_cfg:g} / {sm.later_unit_cfg:g}")
    rep.paragraph(
        f"Mode: **{mode}**. Config `{run.cfg.name}`. Synthetic captioned videos ({cfg.video.num_frames} frames, "
        f"{cfg.video.height}x{cfg.video.width}, {cfg.video.fps} fps) -> causal VAE -> latents + text features -> "
        f"MMDiT teacher (pyramidal flow matching) -> videos for **held-out prompts** (attribute triples never seen "
        f"in training) with the config's schedule ({schedule}) -> strict pixel scorer. Every accuracy stands "
        f"beside its chance level: the same videos scored against deranged captions (no video keeps its own). "
        f"Command: `{' '.join(['neodragon', 'demo'] + run.argv)}`.")
    rows = []
    for attr, target in TARGETS.items():
        acc, chance = gen["accuracy"].get(attr), gen.get("chance", {}).get(attr)
        rows.append([f"{attr} accuracy (held-out prompts)", acc, chance, f">= {target}",
                     "-" if acc is None else ("met" if acc >= target else "below"), _shipped_cell(shipped, attr)])
    rows.append(["VAE reconstruction PSNR (held-out videos, dB)", ev["psnr"], None, "", "", ""])
    rows.append(["VAE reconstruction SSIM (held-out videos)", ev["ssim"], None, "", "", ""])
    rows.append(["total wall time of the phases (s)", sum(r.seconds for r in records.values()), None, "", "", ""])
    rep.heading("Headline").table(["figure", "this run", "chance", "target", "", f"shipped `{SHIPPED_RELEASE}`"],
                                  rows, "lrrrll")
    rep.paragraph(
        f"The targets are those of this from-scratch demo. The last column is the shipped `{SHIPPED_RELEASE}` "
        f"release's recorded scores (`neodragon_jax.releases`), per sampling schedule"
        + (": not shipped in this installation." if shipped is None else "."))

    rep.heading("Phases")
    what = {"data": f"{s.train_videos} training + {s.eval_videos} held-out videos",
            "vae": f"{s.vae_steps} steps, batch {s.vae_batch}, clips of {s.vae_frames} frame(s), "
                   + (f"{s.vae_crop}x{s.vae_crop} crops" if s.vae_crop else "whole frames"),
            "text": f"{records['text'].results.get('params', 0):,} frozen parameters",
            "latents": f"{records['latents'].results.get('records', '?')} records",
            "flow": f"{_flow_steps(records['flow'].results, s)} steps, batch {s.flow_batch}",
            "samples": f"{records['samples'].results.get('videos', '?')} videos, "
                       f"{records['samples'].results.get('nfe_per_video', '?')} NFE each",
            "eval": "VAE PSNR/SSIM, scorer and chance x3, linear baseline"}
    rep.table(["phase", "work", "wall time (s)", "this run"],
              [[r.name, what.get(r.name, ""), f"{r.seconds:.1f}", r.status] for r in records.values()], "llrl")
    rep.paragraph(f"This invocation took {total_seconds:.1f} s. A *reused* phase was finished by an earlier run "
                  f"with the same key (its wall time is the time it took then); *resumed* ones picked up an "
                  f"interrupted run; *rebuilt* ones changed since (the run's output names the differing keys).")

    rep.heading("Scores")
    rep.paragraph("Per-attribute accuracy of the strict pixel scorer (`neodragon_jax.eval.scorer`) against each "
                  "held-out caption, each beside its chance level: on the renderer's own videos (the scorer's "
                  "ceiling), on the VAE's reconstructions of them (the ceiling this VAE allows), and on the "
                  "generated videos.")
    rep.raw(chance_table(ev["scores"], {"renders": "renders", "vae_recon": "VAE reconstructions",
                                        "generated": "generated"}))
    rep.image(records["eval"].dir / "generated_vs_render.png", "generated_vs_render.png",
              "held-out prompts: render and generated video, each row labelled with its prompt")

    v = records["vae"].results
    vs = records["vae"].cfg.stages.get_settings("vae")
    tm = v.get("metrics", {})
    rep.heading("VAE")
    rep.paragraph(
        f"`vae` stage (`train/vae.py`): {v.get('params', 0):,} parameters, loss = {vs.mse_weight:g} MSE + "
        f"{vs.ssim_weight:g} (1 - SSIM) + {vs.kl_weight:g} KL + {vs.chroma_weight:g} chroma MSE on random "
        f"{s.vae_frames}-frame " + (f"{s.vae_crop}x{s.vae_crop} crops" if s.vae_crop else "whole-frame clips")
        + f", AdamW lr {s.vae_lr:g}, `{vs.kernel_init}` kernel init"
        f"{' with zero-init residual branches' if vs.zero_init_residual else ''}. Last training step: "
        + (", ".join(f"{k} {tm[k]:.4g}" for k in ("loss", "psnr", "ssim") if k in tm) or "(resumed complete)")
        + f". Held-out reconstruction (whole clips, posterior mean): PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}.")
    norm = v.get("normalisation", {})
    rep.paragraph("Latent normalisation measured on the trained VAE (used for extraction and generation): "
                  + ", ".join(f"`{k}` = {val:.4f}" for k, val in norm.items()) + ".")
    rep.image(records["eval"].dir / "vae_reconstructions.png", "vae_reconstructions.png",
              "held-out renders and their VAE reconstructions, each row labelled with its prompt")

    f = records["flow"].results
    ft = f.get("metrics", {})
    m = cfg.model.mmdit
    rep.heading("Flow teacher")
    rep.paragraph(
        f"`flow` stage: MMDiT {m.num_layers} blocks x {m.num_heads * m.head_dim} wide ({f.get('params', 0):,} "
        f"parameters), {_flow_steps(f, s)} steps of batch {s.flow_batch}, AdamW lr {s.flow_lr:g}"
        + (f", EMA {s.flow_ema:g} (generation uses it)" if s.flow_ema else "") + ". Last step: "
        + (", ".join(f"{k} {ft[k]:.4g}" for k in ft if k.startswith("loss")) or "-")
        + f". Text features come from the preset's teacher text stack (T5 + CLIP pair) with random, frozen "
        f"weights: the MMDiT learns to read them. Sampling: {schedule} (first / later units).")
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
             "text": "params.npz: the frozen text stack's weights",
             "latents": "records/*.npz, null_text.npz, manifest.json",
             "flow": "MMDiT run: config.json, metrics.jsonl, checkpoints/",
             "samples": "generated NNN.mp4 (lossless, scored), NNN.gif, NNN_frames.png, NNN.json, captions.jsonl",
             "eval": "DONE.json (all scores with chance levels, per-video judgements), contact sheets"}
    rep.paragraph("Each phase's folder holds `PHASE.json` (its key and key tree, written when it starts) and "
                  "`DONE.json` (key, results, wall time) once it finished.")
    rep.bullets([f"`{name}/`: {files.get(name, '')}" for name in records]
                + ["`demo.json`: settings and resolved config (with the measured latent normalisation)"])
    return rep.write()


# ------------------------------------------------------------------------------------------------- main
def add_arguments(p) -> None:
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"run folder (default {DEFAULT_WORKDIR})")
    p.add_argument("--quick", action="store_true", help="toy sizes through every phase (a smoke test)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"preset name or .toml path (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="demo.<field>=value sets a demo setting (e.g. demo.flow_steps=3000); anything else is a "
                        "config override (e.g. optim.b1=0.9) except the keys the demo sets from its settings")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA compilation cache folder, 'none' to disable (default: as `neodragon train`)")


def run(args) -> int:
    from neodragon_jax.config import ConfigError

    t_start = time.perf_counter()
    argv = (["--workdir", args.workdir] + (["--quick"] if args.quick else [])
            + ([f"--config {args.config}"] if args.config != DEFAULT_CONFIG else [])
            + [f"--set {o}" for o in args.overrides])
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
    from train import registry  # noqa: F401 - registers the stages' settings (--set stages.vae.*)
    from train.recipe import run_recipe

    settings, config_overrides = parse_settings(args.overrides, args.quick)
    overrides = list(DEMO_OVERRIDES) + (list(QUICK_OVERRIDES) if args.quick else []) + config_overrides
    cfg = load_config(args.config, overrides)
    _check_vae_clip(cfg, settings)
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compile_cache(args.compile_cache)
    run = DemoRun(workdir, settings, cfg, _mesh(settings), bool(args.quick), argv)
    _say(f"neodragon demo ({'quick' if run.quick else 'full'}) in {workdir}: config {cfg.name!r}, "
         f"{run.devices} {run.mesh.devices.flat[0].platform} device(s)")

    def on_done(rec) -> None:
        if rec.results.get("time_limited"):
            _say(f"[{rec.name}] time limit of {rec.cfg.train.time_limit_s:g} s reached: stopped at step "
                 f"{rec.results.get('end_step')} of {rec.cfg.train.steps}")
        if rec.status != "reused":
            _say(f"[{rec.name}] finished in {_fmt_time(rec.seconds)}"
                 + ("" if rec.status == "ran" else f" ({rec.status})"))

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only-manager warnings on restore
    records = run_recipe(build_phases(run), cfg, workdir, mesh=run.mesh, say=_say, run_kwargs={"console": False},
                         around_train=run.progress, on_done=on_done)

    total = time.perf_counter() - t_start
    _write_json(workdir / "demo.json", {"settings": dataclasses.asdict(settings), "quick": run.quick,
                                        "config": to_dict(records["samples"].cfg), "argv": argv})
    path = write_report(run, records, total)
    ev = records["eval"].results
    gen = ev["scores"]["generated"]
    _say("")
    from neodragon_jax.eval.scorer import ATTRIBUTES

    _say("held-out prompts, generated (chance in brackets): " + ", ".join(
        f"{a} {gen['accuracy'][a]:.3f} ({gen['chance'].get(a, float('nan')):.3f})"
        for a in ATTRIBUTES if a in gen["accuracy"]))
    _say(f"VAE reconstruction on held-out videos: PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}")
    _say("phases: " + ", ".join(f"{r.name} {r.status} {r.seconds:.1f}s" for r in records.values()))
    if all(r.status == "reused" for r in records.values()):
        _say(f"every phase was already complete: nothing rebuilt, this run took {total:.1f} s")
    _say(f"report: {path}")
    return 0
