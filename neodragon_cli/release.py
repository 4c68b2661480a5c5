"""`neodragon release`: trained runs -> a shipped release (official folder layout + ``release.json``).

    neodragon release --flow runs/demo/flow --vae runs/demo/vae --text runs/demo/text/params.npz \\
        --name tiny-teacher --description "..." [--step N] [--dtype float16] [--eval-prompts 96]

1. The models are restored: the VAE from its run (its latest checkpoint), the MMDiT from the flow run (its
   EMA weights when the run kept one; ``--step`` picks a checkpoint), the frozen text stack from its ``.npz``.
   The config is the flow run's own ``config.json`` (it holds the latent normalisation and every shape).
2. They are written in the official folder layout with ``--dtype`` storage (``export.convert``), into a
   staging folder that replaces ``--out`` (default: the package's ``_assets/releases/NAME``) only at the end.
3. The written folder is loaded back the way users load it and evaluated on the held-out prompts
   (``neodragon_jax.eval.heldout``) for every ``--schedules`` entry, each accuracy beside its chance level;
   ``--dtype`` storage is checked against the float32 weights on the first prompts (pixel difference and
   scores), so "fp16 loses nothing measurable" is a measurement in the record.
4. ``release.json`` records the command, commit, device, wall times, training clips seen, the scores and
   the sha256 of every file (``neodragon_jax.releases`` checks them on load).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


class ReleaseUsageError(Exception):
    """A user error: one line, exit status 2."""


def add_arguments(p) -> None:
    p.add_argument("--flow", required=True, help="the flow training run (folder with config.json and checkpoints/)")
    p.add_argument("--vae", required=True, help="the vae training run the flow run's latents came from")
    p.add_argument("--text", required=True, help="the frozen text stack's weights (.npz; the demo's text/params.npz)")
    p.add_argument("--step", type=int, default=None, help="flow checkpoint step (default: the latest)")
    p.add_argument("--raw", action="store_true", help="the flow run's trained weights instead of its EMA")
    p.add_argument("--name", default="tiny-teacher", help="release name (default tiny-teacher)")
    p.add_argument("--description", default="", help="one line for `neodragon generate --list`")
    p.add_argument("--out", default=None, help="release folder (default: the package's _assets/releases/NAME)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the weights (default float16)")
    p.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts per schedule (default 96)")
    p.add_argument("--schedules", default="teacher,4-4-4,1-1-1",
                   help="comma-separated: 'teacher' (the config's sampling) or N-N-N (all units, no CFG for 1-1-1) "
                        "or FIRST/LATER@CFG1/CFG2, e.g. 20-20-20/10-10-10@7/5")
    p.add_argument("--dtype-check-prompts", type=int, default=8,
                   help="prompts generated with both the float32 and the stored weights (default 8)")
    p.add_argument("--reference-videos", type=int, default=8,
                   help="videos of the first schedule kept in the release (reference.npz) with their judgements, "
                        "so the release can be checked by regenerating them (default 8)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override recorded in the release (e.g. sampling.first_unit_steps=[10,10,10])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing release folder")
    p.add_argument("--training-command", default="", help="the command that trained the runs (recorded)")


def parse_schedules(text: str, cfg) -> list[tuple[str, tuple, tuple, tuple]]:
    """``[(label, first, later, cfg_scales)]`` from ``--schedules``."""
    from neodragon_jax.pipelines.text_to_video import ScheduleError, parse_cfg_scales, parse_schedule

    s = cfg.sampling
    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if item == "teacher":
            out.append(("teacher", s.first_unit_steps, s.later_unit_steps, (s.first_unit_cfg, s.later_unit_cfg)))
            continue
        steps, _, guidance = item.partition("@")
        try:
            first, later = parse_schedule(steps.replace("/", ","), cfg.pyramid.num_stages)
            if guidance:
                scales = parse_cfg_scales(guidance.replace("/", ","), (0.0, 0.0))
            elif set(first) == {1} and set(later) == {1}:
                scales = (0.0, 0.0)  # 1-1-1 without distillation runs without guidance, as a distilled model
            else:
                scales = (s.first_unit_cfg, s.later_unit_cfg)
        except ScheduleError as e:
            raise ReleaseUsageError(f"--schedules {item!r}: {e}") from None
        out.append((item, first, later, scales))
    if not out:
        raise ReleaseUsageError("--schedules is empty")
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReleaseUsageError(f"{path}: cannot read ({e})") from None


def _clips_seen(run: Path, cfg) -> dict:
    """Training examples a run consumed: its last logged step x its global batch (x clip frames for a VAE)."""
    last = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                try:
                    last = json.loads(line)
                except ValueError:
                    break
    steps = int(last["step"]) + 1 if last else 0
    out = {"steps": steps, "global_batch": cfg.train.global_batch, "examples": steps * cfg.train.global_batch}
    # A recipe phase (the demo's) records its wall time; a run made by `neodragon train` alone does not.
    done = run / "DONE.json"
    if done.is_file():
        try:
            out["wall_time_s"] = float(json.loads(done.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):
            pass
    return out


def build_pipeline(flow: Path, vae: Path, text: Path, *, step: int | None, ema: bool, overrides):
    """The pipeline the runs make (float32), its config and the flow step it used."""
    import jax
    from flax import nnx

    from neodragon_jax.config import from_dict
    from neodragon_jax.config.loader import apply_overrides
    from neodragon_jax.layers.core import as_dtype
    from neodragon_jax.models.build import abstract
    from neodragon_jax.models.mmdit import PyramidMMDiT
    from neodragon_jax.models.text.conditioner import TextConditioner
    from neodragon_jax.models.text.tokenizers import TextTokenizers
    from neodragon_jax.models.vae import CausalVideoVAE
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
    from train.weights import assign, load_weights, run_state

    for what, path in (("--flow", flow), ("--vae", vae)):
        if not (path / "config.json").is_file():
            raise ReleaseUsageError(f"{what} {path}: not a training run (no config.json)")
    if not text.is_file():
        raise ReleaseUsageError(f"--text {text}: no such file")
    cfg = from_dict(_read_json(flow / "config.json"))
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    step, _ = run_state(flow, step)  # the step actually used (latest if None), checked to exist
    kw = dict(dtype=as_dtype(cfg.precision.dtype), param_dtype=jax.numpy.float32)
    m = cfg.model
    mmdit = abstract(lambda: PyramidMMDiT(m.mmdit, rngs=nnx.Rngs(0), **kw))
    mmdit = assign(mmdit, load_weights(f"run:{flow}@{step}{':ema' if ema else ''}#mmdit", mmdit))
    vae_model = abstract(lambda: CausalVideoVAE(m.vae, decoder=m.vae.decoder, rngs=nnx.Rngs(0), **kw))
    vae_model = assign(vae_model, load_weights(f"run:{vae}#vae", vae_model))
    text_model = abstract(lambda: TextConditioner(m.text, rngs=nnx.Rngs(0), **kw))
    text_model = assign(text_model, load_weights(f"npz:{text}", text_model))
    pipe = TextToVideoPipeline(cfg, TextTokenizers.for_config(m.text), text_model, mmdit, vae_model,
                               source=f"runs {flow} (step {step}{', EMA' if ema else ''}), {vae}, {text}")
    return pipe, cfg, step


def write_release_folder(pipe, folder: Path, *, name: str, dtype: str, transformer: str = "diffusion_transformer_320p",
                         description: str = "", overrides=()) -> dict:
    """Write ``pipe``'s models as an official-layout ``folder`` with ``dtype`` storage and a first
    ``release.json`` (name, preset, the resolved config, the sha256 of every file); returns the record."""
    from export.convert import jax_to_official_folder
    from neodragon_jax.config import to_dict
    from neodragon_jax.releases import RECORD, file_digest

    jax_to_official_folder(pipe, folder, dtype=dtype, transformer_folder=transformer)
    record = {"name": name, "description": description, "preset": pipe.cfg.name, "transformer": transformer,
              "overrides": list(overrides), "storage_dtype": dtype, "config": to_dict(pipe.cfg)}
    record["files"] = {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*"))
                       if p.is_file() and p.name != RECORD}
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def run(args) -> int:
    try:
        return _run(args)
    except ReleaseUsageError as e:
        print(f"neodragon release: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import jax
    import numpy as np

    from neodragon_jax.config import from_dict
    from neodragon_jax.eval.heldout import evaluate_heldout, heldout_prompts
    from neodragon_jax.pipelines.text_to_video import GenerationRequest, TextToVideoPipeline
    from neodragon_jax.releases import RECORD, REFERENCE, RELEASES_DIR, file_digest, get_release
    from train.weights import WeightSourceError

    t_start = time.perf_counter()
    out = Path(args.out) if args.out else RELEASES_DIR / args.name
    if out.exists() and not args.overwrite:
        raise ReleaseUsageError(f"{out} exists; pass --overwrite to replace it")
    if args.eval_prompts < 2:
        raise ReleaseUsageError("--eval-prompts must be >= 2 (the chance level deranges the captions)")
    flow, vae, text = Path(args.flow), Path(args.vae), Path(args.text)
    try:
        pipe32, cfg, step = build_pipeline(flow, vae, text, step=args.step, ema=not args.raw,
                                           overrides=args.overrides)
    except WeightSourceError as e:
        raise ReleaseUsageError(str(e)) from None
    schedules = parse_schedules(args.schedules, cfg)
    transformer = "diffusion_transformer_320p"
    staging = out.with_name(f".{out.name}.release-staging")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[release] writing {args.name} ({args.dtype} storage) from {flow} step {step}", flush=True)
    record = write_release_folder(pipe32, staging, name=args.name, dtype=args.dtype, transformer=transformer,
                                  description=args.description, overrides=args.overrides)
    # Evaluated as users load it: through its record, hashes checked.
    release = get_release(staging.name, root=staging.parent)
    release.verify()
    pipe = TextToVideoPipeline.from_official(staging, release.config(), transformer=transformer)

    # Storage dtype against the float32 weights on the same prompts and seeds.
    prompts = heldout_prompts(args.eval_prompts)
    k = min(args.dtype_check_prompts, len(prompts))
    diffs = []
    for i in range(k):
        req = GenerationRequest(prompt=prompts[i], seed=i)
        a = pipe32.generate(req).frames.astype(np.int16)
        b = pipe.generate(req).frames.astype(np.int16)
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    mse = float(np.mean((d / 255.0) ** 2))
    dtype_check = {"prompts": k, "max_abs_pixel_diff": int(d.max()), "mean_abs_pixel_diff": float(d.mean()),
                   "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")}
    print(f"[release] {args.dtype} vs float32 on {k} prompts: max |diff| {dtype_check['max_abs_pixel_diff']}/255, "
          f"mean {dtype_check['mean_abs_pixel_diff']:.3f}, PSNR {dtype_check['psnr_db']:.1f} dB", flush=True)

    scores, reference = {}, None
    for label, first, later, scales in schedules:
        t0 = time.perf_counter()

        def progress(i, n, label=label):
            if i == n or i % 16 == 0:
                rate = i / max(time.perf_counter() - t0, 1e-9)
                print(f"[release] {label}: {i}/{n} videos, {rate:.2f} video/s, ETA {(n - i) / rate:.0f} s", flush=True)

        res = evaluate_heldout(pipe, prompts, first_unit_steps=first, later_unit_steps=later, cfg_scales=scales,
                               progress=progress)
        scores[label] = res.as_dict()
        if reference is None:
            # The first schedule's first videos, kept so that anyone (CI included) can regenerate them from the
            # shipped files and check pixels and judgements against what this command measured.
            k_ref = min(args.reference_videos, len(prompts))
            np.savez_compressed(staging / REFERENCE, videos=np.stack(res.videos[:k_ref]))
            reference = {"file": REFERENCE, "schedule": label, "first_unit_steps": list(first),
                         "later_unit_steps": list(later), "cfg_scales": list(scales), "prompts": prompts[:k_ref],
                         "seeds": list(range(k_ref)),
                         # The noise depends on JAX's RNG mode (the test suite turns partitionable off).
                         "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
                         "judgements": [v.judgements for v in res.report.videos[:k_ref]]}
        acc, ch = res.report.accuracy, res.chance
        print(f"[release] {label} ({res.schedule}, {res.nfe} NFE): " + ", ".join(
            f"{a} {acc[a]:.3f} (chance {ch[a]:.3f})" for a in ("colour", "motion", "shape", "background") if a in acc),
            flush=True)

    flow_cfg = cfg
    vae_cfg = _read_json(vae / "config.json")
    vae_cfg.pop("stages", None)  # a run of an older layout may record stage settings the schema reads differently
    record.update({
        "made_by": {
            "command": "neodragon release " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["release"] else sys.argv[1:]),
            "commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}",
            "training_command": args.training_command,
            "flow_run": str(flow), "flow_step": step, "flow_weights": "raw" if args.raw else "ema",
            "vae_run": str(vae), "text_weights": str(text),
            "flow_training": _clips_seen(flow, flow_cfg),
            "vae_training": _clips_seen(vae, from_dict(vae_cfg)),
            "release_seconds": time.perf_counter() - t_start,
        },
        "dtype_check": dtype_check,
        "scores": scores,
        "reference": reference,
    })
    record["files"][REFERENCE] = file_digest(staging / REFERENCE)
    (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    get_release(staging.name, root=staging.parent).verify()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[release] {args.name}: {out} ({size / 2**20:.1f} MiB)")
    return 0


__all__ = ["add_arguments", "build_pipeline", "parse_schedules", "run", "write_release_folder"]
