"""`neodragon extract`: a captioned video folder -> the teacher's training records (normalised VAE latents,
text features and the empty prompt's features), the data of `train flow`, `recover-flow` and
`recover-distill`.

    neodragon extract --videos data/shapes --out cache/shapes                       # the shipped tiny-teacher
    neodragon extract --videos /data/clips --out /data/records \\
        --checkpoint /ckpt/pyramid-flow-sd3 --config pyramid-flow-sd3-320p            # full size

The cache is resumable (a rerun skips finished records; a cache made with another model, resolution or seed
is refused, naming what differs, unless ``--overwrite``). Unreadable videos are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path


class ExtractError(Exception):
    """A user-facing problem: one line, exit status 2."""


def add_arguments(p) -> None:
    from neodragon_cli.prune import _teacher_args

    p.add_argument("--videos", required=True, help="a video folder with captions.jsonl (see README, Data)")
    p.add_argument("--out", required=True, help="the cache folder: records/, null_text.npz, manifest.json")
    _teacher_args(p)
    p.add_argument("--batch", type=int, default=8, help="videos per encoder call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    p.add_argument("--null-in-records", action="store_true",
                   help="copy the empty prompt's features into every record (needed by data.in_memory=true)")


def run(args) -> int:
    from neodragon_cli.dmd import _guard

    return _guard(lambda: _extract(args), "extract", (ExtractError,))


def _extract(args) -> int:
    from neodragon_cli.prune import load_teacher
    from neodragon_jax.data.extract import CacheMismatchError, extract
    from neodragon_jax.data.video_folder import DatasetError

    if args.batch < 1:
        raise ExtractError(f"--batch must be >= 1, got {args.batch}")
    if not Path(args.videos).is_dir():
        raise ExtractError(f"--videos {args.videos!r} is not a folder (it needs captions.jsonl and the videos)")
    pipe = load_teacher(args)
    v = pipe.cfg.video
    print(f"extracting {args.videos} with {pipe.source}'s VAE encoder and text encoders at {v.height}x{v.width}, "
          f"{v.num_frames} frames -> {args.out}", flush=True)
    try:
        res = extract(args.videos, args.out, pipe.cfg, vae=pipe.vae, text=pipe.text, seed=args.seed,
                      batch_size=args.batch, null_in_records=args.null_in_records, overwrite=args.overwrite)
    except CacheMismatchError as e:
        raise ExtractError(str(e).replace("overwrite=True", "--overwrite")) from None
    except DatasetError as e:
        raise ExtractError(f"--videos: {e}") from None
    print(f"{res.done} records in {res.records_dir} ({res.processed} written now, {res.skipped} videos unreadable, "
          f"{res.seconds:.0f} s); train with: --records {res.records_dir}", flush=True)
    return 0 if res.done else 2
