"""`neodragon generate`: prompt(s) -> mp4 + gif + PNG contact sheet + JSON sidecar per video.

Everything the user gives is checked before a model is built (prompts, output path, schedule, CFG, frame
count); a user error is one line on stderr and exit status 2. The model work (loading, sampling) runs in a
worker thread while the main thread waits, so Ctrl-C stops at once even inside a long XLA compilation
(exit status 130); every finished video is on disk by then, and a video whose files cannot be written is
saved in a rescue folder instead of being lost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --random-weights - running on RANDOM weights. The pipeline runs end to end, but the video is "
    "noise. Leave it out for the shipped model, or pass --checkpoint DIR (an official Neodragon / Pyramid Flow "
    "folder)."
)


class UsageError(Exception):
    """A user error: printed as one line (no traceback), exit status 2."""


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the text prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--model", default=None,
                   help="a shipped release (default: the newest, tiny-teacher); see `neodragon generate --list`")
    p.add_argument("--config", default=None,
                   help="preset name or .toml path, with --checkpoint or --random-weights (default: tiny); a "
                        "shipped release brings its own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set sampling.first_unit_cfg=5)")
    p.add_argument("--checkpoint", default=None,
                   help="folder in the official Neodragon / Pyramid Flow layout (instead of a shipped release)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights with --config's shapes: the pipeline end to end, the video is noise")
    p.add_argument("--list", action="store_true", help="list the shipped releases with their scores and exit")
    p.add_argument("--transformer", default=None,
                   help="transformer folder inside --checkpoint (e.g. diffusion_transformer_320p_multistep_t2v)")
    p.add_argument("--schedule", default=None,
                   help="steps per stage: '1-1-1' (all units) or 'FIRST,LATER' e.g. '20-20-20,10-10-10'")
    p.add_argument("--cfg", default=None, help="CFG scale(s): '7,5' (first unit, later units) or '0' for none")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=None, help="output frames (1 + 8k, e.g. 49); default from config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/video.mp4",
                   help="output mp4 path; the gif, contact sheet PNG and JSON sidecar go beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(msg) -> int:
    print(f"neodragon generate: {msg}", file=sys.stderr)
    return 2


def _prompts(args) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {str(path)!r} has no prompts")
        return prompts
    if args.prompt is None:
        raise UsageError("give a PROMPT or --prompts-file FILE")
    return [args.prompt]


def _out_paths(out: Path, index: int, many: bool) -> dict[str, Path]:
    stem = f"{out.stem}_{index:03d}" if many else out.stem
    base = out.with_name(stem)
    return {
        "mp4": base.with_suffix(".mp4"),
        "gif": base.with_suffix(".gif"),
        "png": base.with_name(stem + "_frames.png"),
        "json": base.with_suffix(".json"),
    }


def _model_source(args):
    """``(release or None, config)`` from ``--model`` / ``--checkpoint`` / ``--random-weights`` (one of them;
    none means the default release)."""
    from neodragon_jax.config import load_config
    from neodragon_jax.releases import DEFAULT_RELEASE, get_release

    given = [flag for flag, on in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                   ("--random-weights", args.random_weights)) if on]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other: pick a shipped release (--model), an official "
                         f"folder (--checkpoint) or random weights (--random-weights)")
    if args.checkpoint or args.random_weights:
        return None, load_config(args.config or "tiny", args.overrides)
    if args.config is not None:
        raise UsageError("--config goes with --checkpoint or --random-weights: a shipped release (--model) brings "
                         "its own config (change e.g. its sampling with --set)")
    release = get_release(args.model or DEFAULT_RELEASE)
    return release, release.config(args.overrides)


def _list_releases() -> int:
    from neodragon_jax.releases import DEFAULT_RELEASE, available_releases, get_release

    names = available_releases()
    if not names:
        print("no shipped releases in this installation")
        return 0
    for name in names:
        rec = get_release(name).record
        default = " (default)" if name == DEFAULT_RELEASE else ""
        print(f"{name}{default}: {rec.get('description', '')}")
        for schedule, sc in (rec.get("scores") or {}).items():
            acc = sc.get("accuracy", {})
            chance = sc.get("chance", {})
            # "teacher" is the record's key for the release's own default schedule (its config's sampling).
            label = f"default ({sc.get('schedule', '?')}, {sc.get('nfe', '?')} NFE)" if schedule == "teacher" else schedule
            print(f"  {label}: " + ", ".join(
                f"{a} {acc[a]:.2f} (chance {chance[a]:.2f})" if a in chance else f"{a} {acc[a]:.2f}"
                for a in ("colour", "motion", "shape", "background") if a in acc))
    return 0


def _frames(requested: int | None, cfg) -> int:
    """The frame count to generate: refused (UsageError / ScheduleError) before any model work."""
    from neodragon_jax.pipelines.text_to_video import latent_shape

    if requested is not None and requested < 1:
        raise UsageError(f"--frames must be a positive 1 + {cfg.model.vae.causal.temporal_factor}k "
                         f"(1, {1 + cfg.model.vae.causal.temporal_factor}, ..., 49, ...), got {requested}")
    frames = cfg.video.num_frames if requested is None else requested
    latent_shape(cfg, frames)  # 1 + 8k and the resolution, from the config alone
    return frames


def _length_warning(cfg, frames: int, first, later, scales) -> str | None:
    """A warning with the cost of a video longer than the config was made for, else None."""
    from neodragon_jax.pipelines.text_to_video import latent_shape
    from neodragon_jax.pyramid.history import num_units
    from neodragon_jax.pyramid.sampler import count_nfe

    trained = cfg.video.num_frames
    if frames <= trained:
        return None
    t_lat = latent_shape(cfg, frames)[0]
    s = cfg.sampling
    units = num_units(t_lat, cfg.pyramid.frames_per_unit)
    nfe = count_nfe(t_lat, first_unit_steps=first or s.first_unit_steps, later_unit_steps=later or s.later_unit_steps,
                    first_unit_cfg=scales[0], later_unit_cfg=scales[1], frames_per_unit=cfg.pyramid.frames_per_unit)
    return (f"WARNING: --frames {frames} is above the {trained} frames config {cfg.name!r} is made for "
            f"(video.num_frames): quality past that length is untested. Cost per video: {t_lat} latent frames in "
            f"{units} units x {cfg.pyramid.num_stages} stages = {nfe} model calls and {units * cfg.pyramid.num_stages} "
            f"step compilations (each unit sees a longer history). Ctrl-C stops it.")


def _in_worker(fn):
    """``fn()`` in a worker thread while this (main) thread waits, so Ctrl-C is handled at once: a long XLA
    compile or run releases the GIL but would hold off the main thread's signal handling until it returns."""
    box: dict = {}
    done = threading.Event()  # not Thread.is_alive(): a join interrupted by Ctrl-C marks a live thread stopped

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="neodragon-generate", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        raise _Interrupted(done) from None
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Interrupted(Exception):
    def __init__(self, done: threading.Event | None = None):
        super().__init__("interrupted")
        self.busy = done is not None and not done.is_set()


def run(args) -> int:
    from neodragon_jax.config import ConfigError
    from neodragon_jax.data.video_io import check_writable
    from neodragon_jax.pipelines.text_to_video import ScheduleError, parse_cfg_scales, parse_schedule

    from neodragon_jax.releases import ReleaseError

    if args.list:
        return _list_releases()
    try:
        prompts = _prompts(args)
        out = Path(args.out)
        if out.suffix.lower() != ".mp4":
            raise UsageError(f"--out must end in .mp4, got {str(out)!r} (the gif, PNG and JSON go beside it)")
        release, cfg = _model_source(args)
        for path in _out_paths(out, 0, len(prompts) > 1).values():
            check_writable(path)
        first = later = None
        if args.schedule:
            first, later = parse_schedule(args.schedule, cfg.pyramid.num_stages)
        scales = parse_cfg_scales(args.cfg, (cfg.sampling.first_unit_cfg, cfg.sampling.later_unit_cfg))
        if args.schedule and args.cfg is None and set(first) == {1} and set(later) == {1}:
            scales = (0.0, 0.0)  # distilled 1-1-1 runs without guidance (spec §3.6)
        frames = _frames(args.frames, cfg)
    except (UsageError, ScheduleError, OSError, ReleaseError) as e:
        return _fail(e)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    warning = _length_warning(cfg, frames, first, later, scales)
    if warning:
        print(warning, file=sys.stderr)

    written: list[Path] = []
    try:
        return _generate(args, release, cfg, prompts, out, frames, first, later, scales, written)
    except (_Interrupted, KeyboardInterrupt) as e:
        sys.stdout.flush()
        print(f"\nneodragon generate: interrupted (Ctrl-C); {len(written)} of {len(prompts)} video(s) written"
              + (f": {', '.join(map(str, written))}" if written else ""), file=sys.stderr, flush=True)
        if getattr(e, "busy", False):
            # The worker is inside model work that cannot be cancelled (an XLA compile or run); interpreter
            # shutdown would wait for it or abort in it. Every finished video is already renamed into place.
            os._exit(130)
        return 130


def _generate(args, release, cfg, prompts, out, frames, first, later, scales, written: list[Path]) -> int:
    from neodragon_jax.config import ConfigError, to_dict
    from neodragon_jax.convert.io import CheckpointNotFoundError, CheckpointReadError
    from neodragon_jax.convert.keymap import CheckpointMismatchError
    from neodragon_jax.pipelines.text_to_video import GenerationRequest, ScheduleError, TextToVideoPipeline
    from neodragon_jax.releases import ReleaseError

    t0 = time.perf_counter()
    try:
        if release is not None:
            def load():
                release.verify()
                return TextToVideoPipeline.from_official(release.folder, cfg, transformer=release.transformer)

            pipe = _in_worker(load)
            pipe.source = f"shipped release {release.name!r} ({release.folder})"
        elif args.checkpoint:
            pipe = _in_worker(lambda: TextToVideoPipeline.from_official(args.checkpoint, cfg,
                                                                        transformer=args.transformer))
        else:
            print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
            pipe = _in_worker(lambda: TextToVideoPipeline.random(cfg, seed=args.seed))
    except (CheckpointNotFoundError, CheckpointReadError, ReleaseError) as e:
        return _fail(e)
    except ConfigError as e:  # the preset contradicts the checkpoint's config.json
        return _fail(e)
    except CheckpointMismatchError as e:
        return _fail(f"--checkpoint {args.checkpoint!r} does not fit config {cfg.name!r}: {e}")
    load_time = time.perf_counter() - t0
    try:
        t_lat = pipe.latent_shape(frames)[0]  # the checkpoint's config may differ from the preset's
    except ScheduleError as e:
        return _fail(e)

    from tqdm.auto import tqdm

    rescue: Path | None = None
    for i, prompt in enumerate(prompts):
        req = GenerationRequest(prompt=prompt, seed=args.seed, num_frames=frames, first_unit_steps=first,
                                later_unit_steps=later, cfg_scales=scales, negative_prompt=args.negative_prompt)
        bar = tqdm(total=t_lat * cfg.pyramid.num_stages, desc=f"video {i + 1}/{len(prompts)}", unit="stage",
                   disable=args.no_progress, file=sys.stderr)

        def progress(unit, stage, total_units, bar=bar):
            bar.set_postfix_str(f"unit {unit + 1}/{total_units} stage {stage}")
            bar.update(1)

        try:
            result = _in_worker(lambda: pipe.generate(req, progress=progress))
        finally:
            bar.close()
        paths = _out_paths(out, i, len(prompts) > 1)
        sidecar = {
            "prompt": result.prompt,
            "full_prompt": result.full_prompt,
            "seed": result.seed,
            "frames": int(result.frames.shape[0]),
            "size": [int(result.frames.shape[1]), int(result.frames.shape[2])],
            "fps": cfg.video.fps,
            "schedule": result.schedule,
            "nfe": result.nfe,
            "timings_s": {"load": load_time if i == 0 else 0.0, **result.timings},
            "weights": pipe.source,
            "random_weights": result.random_weights,
            "config": to_dict(pipe.cfg),
        }
        if rescue is None:
            try:
                _write(result.frames, paths, sidecar, cfg.video.fps)
            except OSError as e:
                rescue = Path(tempfile.mkdtemp(prefix="neodragon-rescued-"))
                print(f"neodragon generate: cannot write {paths['mp4']} ({e}); saving the videos in {rescue} "
                      f"instead", file=sys.stderr)
        if rescue is not None:
            paths = _out_paths(rescue / out.name, i, len(prompts) > 1)
            _write(result.frames, paths, sidecar, cfg.video.fps)
        written.append(paths["mp4"])
        total = sum(result.timings.values())
        print(f"wrote {paths['mp4']} ({result.frames.shape[0]} frames {result.frames.shape[1]}x"
              f"{result.frames.shape[2]}, {result.nfe} NFE, {total:.1f} s)")
    if rescue is not None:
        return _fail(f"the output folder of {str(out)!r} could not be written; the video(s) are in {rescue}")
    return 0


def _write(frames, paths: dict[str, Path], sidecar: dict, fps: int) -> None:
    from neodragon_jax.data.video_io import contact_sheet, write_gif, write_mp4, write_png

    write_mp4(frames, paths["mp4"], fps=fps)
    write_gif(frames, paths["gif"], fps=fps)
    write_png(contact_sheet(frames), paths["png"])
    paths["json"].write_text(json.dumps({**sidecar, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
