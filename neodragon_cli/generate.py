"""`neodragon generate`: prompt(s) -> mp4 + gif + PNG contact sheet + JSON sidecar per video."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RANDOM_WEIGHTS_WARNING = (
    "WARNING: no checkpoint given - running on RANDOM weights. The pipeline runs end to end, but the video "
    "is noise. Pass --checkpoint DIR (an official Neodragon / Pyramid Flow folder) for real videos."
)


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the text prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--config", default="tiny", help="preset name or .toml path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", default=None,
                   help="folder in the official Neodragon / Pyramid Flow layout (default: random weights)")
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


def _prompts(args) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"neodragon generate: prompts file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"neodragon generate: prompts file {str(path)!r} has no prompts")
        return prompts
    if args.prompt is None:
        raise SystemExit("neodragon generate: give a PROMPT or --prompts-file FILE")
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


def run(args) -> int:
    from neodragon_jax.config import load_config, to_dict
    from neodragon_jax.data.video_io import (
        check_writable, contact_sheet, write_gif, write_mp4, write_png,
    )
    from neodragon_jax.pipelines.text_to_video import (
        GenerationRequest, ScheduleError, TextToVideoPipeline, parse_cfg_scales, parse_schedule,
    )

    prompts = _prompts(args)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise SystemExit(f"neodragon generate: --out must end in .mp4, got {str(out)!r}")
    try:
        for path in _out_paths(out, 0, len(prompts) > 1).values():
            check_writable(path)
        first = later = None
        if args.schedule:
            first, later = parse_schedule(args.schedule, cfg.pyramid.num_stages)
        scales = parse_cfg_scales(args.cfg, (cfg.sampling.first_unit_cfg, cfg.sampling.later_unit_cfg))
        if args.schedule and args.cfg is None and set(first) == {1} and set(later) == {1}:
            scales = (0.0, 0.0)  # distilled 1-1-1 runs without guidance (spec §3.6)
        frames = args.frames or cfg.video.num_frames
    except (ScheduleError, OSError) as e:
        print(f"neodragon generate: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    if args.checkpoint:
        from neodragon_jax.config import ConfigError
        from neodragon_jax.convert.io import CheckpointNotFoundError, CheckpointReadError
        from neodragon_jax.convert.keymap import CheckpointMismatchError

        try:
            pipe = TextToVideoPipeline.from_official(args.checkpoint, cfg, transformer=args.transformer)
        except (CheckpointNotFoundError, CheckpointReadError, ConfigError) as e:
            # a missing / incomplete / damaged folder, or a preset that contradicts its config.json
            print(f"neodragon generate: {e}", file=sys.stderr)
            return 2
        except CheckpointMismatchError as e:
            print(f"neodragon generate: --checkpoint {args.checkpoint!r} does not fit config {cfg.name!r}: {e}",
                  file=sys.stderr)
            return 2
    else:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        pipe = TextToVideoPipeline.random(cfg, seed=args.seed)
    load_time = time.perf_counter() - t0
    try:
        pipe.latent_shape(frames)
    except ScheduleError as e:
        print(f"neodragon generate: {e}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    for i, prompt in enumerate(prompts):
        req = GenerationRequest(prompt=prompt, seed=args.seed, num_frames=frames, first_unit_steps=first,
                                later_unit_steps=later, cfg_scales=scales, negative_prompt=args.negative_prompt)
        t_lat = pipe.latent_shape(frames)[0]
        bar = tqdm(total=t_lat * cfg.pyramid.num_stages, desc=f"video {i + 1}/{len(prompts)}", unit="stage",
                   disable=args.no_progress, file=sys.stderr)

        def progress(unit, stage, total_units, bar=bar):
            bar.set_postfix_str(f"unit {unit + 1}/{total_units} stage {stage}")
            bar.update(1)

        result = pipe.generate(req, progress=progress)
        bar.close()
        paths = _out_paths(out, i, len(prompts) > 1)
        fps = cfg.video.fps
        write_mp4(result.frames, paths["mp4"], fps=fps)
        write_gif(result.frames, paths["gif"], fps=fps)
        write_png(contact_sheet(result.frames), paths["png"])
        sidecar = {
            "prompt": result.prompt,
            "full_prompt": result.full_prompt,
            "seed": result.seed,
            "frames": int(result.frames.shape[0]),
            "size": [int(result.frames.shape[1]), int(result.frames.shape[2])],
            "fps": fps,
            "schedule": result.schedule,
            "nfe": result.nfe,
            "timings_s": {"load": load_time if i == 0 else 0.0, **result.timings},
            "weights": pipe.source,
            "random_weights": result.random_weights,
            "files": {k: str(v) for k, v in paths.items()},
            "config": to_dict(pipe.cfg),
        }
        paths["json"].write_text(json.dumps(sidecar, indent=2))
        total = sum(result.timings.values())
        print(f"wrote {paths['mp4']} ({result.frames.shape[0]} frames {result.frames.shape[1]}x"
              f"{result.frames.shape[2]}, {result.nfe} NFE, {total:.1f} s)")
    return 0
