"""`neodragon synthesize` (the teacher's videos as DMD training records) and `neodragon dmd eval|export`.

* ``synthesize``: the teacher (a release or an official folder) generates one video per prompt with its schedule
  and CFG, in batches, resumable, into ``OUT/records`` (train with ``--records OUT/records``) plus a contact
  sheet of the first videos;
* ``dmd eval --run DIR``: on held-out prompts, the teacher with its schedule and CFG, the same teacher at 1-1-1,
  the DMD generator at 1-1-1 and 4-4-4 (no CFG) and the hybrid (the teacher's multi-step first frame, then the
  generator at 1-1-1): accuracy per attribute beside chance, the share of the teacher's accuracy kept, NFE and
  time per video -> ``report.md`` / ``eval.json`` with a contact sheet;
* ``dmd export --run DIR --out FOLDER``: the generator as an official folder (``neodragon generate --checkpoint``).

User errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from neodragon_cli.prune import (KEPT_ATTRIBUTES, PruneError, _acc, _schedule_args, _teacher_args, load_teacher,
                                 video_cache, video_cache_arg)

HELDOUT_DEFAULT = 96


class DMDError(Exception):
    """A user error: one line, exit status 2."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def add_synthesize_arguments(p: argparse.ArgumentParser) -> None:
    _teacher_args(p)
    _schedule_args(p)
    p.add_argument("--prompts", type=int, default=4096, help="tiny-domain training captions to generate")
    p.add_argument("--corpus", default=None, help="instead: a prompt corpus folder (its train.jsonl)")
    p.add_argument("--batch", type=int, default=32, help="videos per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--process-index", type=int, default=0, help="this host's share of the batches")
    p.add_argument("--process-count", type=int, default=1)
    p.add_argument("--devices", type=int, default=None,
                   help="local devices each batch is split over (default: the most that divide --batch)")
    p.add_argument("--out", required=True, help="output folder (records/, synthesize.json, sheet.png); resumable")


def add_dmd_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("eval", help="teacher vs the DMD generator (1-1-1, 4-4-4, hybrid) on held-out prompts")
    e.add_argument("--run", required=True, help="a dmd run folder")
    e.add_argument("--prompts", type=int, default=HELDOUT_DEFAULT, help=f"held-out prompts (default {HELDOUT_DEFAULT})")
    e.add_argument("--raw", action="store_true", help="the raw generator weights instead of its EMA")
    e.add_argument("--out", default=None, help="report folder (default RUN/eval)")
    e.add_argument("--teacher-schedule", action="append", default=[], metavar="A-B-C",
                   help="also score the teacher at this schedule with its CFG (repeatable; e.g. 20-20-20, the "
                        "paper's teacher schedule); NFE ratios are then reported against each teacher row")
    video_cache_arg(e)
    x = sub.add_parser("export", help="the DMD generator as an official folder")
    x.add_argument("--run", required=True, help="a dmd run folder")
    x.add_argument("--raw", action="store_true")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")


def _guard(fn, verb: str, errors: tuple = ()):
    from neodragon_jax.config import ConfigError
    from neodragon_jax.convert.keymap import CheckpointMismatchError
    from neodragon_jax.data.synthesize import SynthesizeError

    try:
        return fn()
    except (DMDError, PruneError, SynthesizeError, FileNotFoundError, FileExistsError, ConfigError,
            CheckpointMismatchError, *errors) as e:
        print(f"neodragon {verb}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from neodragon_jax.pipelines.text_to_video import ScheduleError
        from neodragon_jax.releases import ReleaseError
        from train.weights import WeightSourceError

        if isinstance(e, (ScheduleError, ReleaseError, WeightSourceError)):
            print(f"neodragon {verb}: {e}", file=sys.stderr)
            return 2
        raise


# ------------------------------------------------------------------------------------------ synthesize
def run_synthesize(args) -> int:
    return _guard(lambda: _synthesize(args), "synthesize")


def _synthesize(args) -> int:
    from neodragon_cli.prune import _steps, calibration_prompts
    from neodragon_jax.data.synthesize import synthesize_records

    if args.corpus:
        from neodragon_jax.data.prompts import load_corpus

        prompts = list(load_corpus(args.corpus).train)
    else:
        if args.prompts < 1:
            raise DMDError("--prompts must be at least 1")
        prompts = calibration_prompts(args.prompts, args.seed + 7, None)
    teacher = load_teacher(args)
    first, later, scales = _steps(args, teacher)
    _say(f"synthesizing {len(prompts)} videos with {teacher.source}: schedule {'-'.join(map(str, first))},"
         f"{'-'.join(map(str, later))} cfg {scales[0]:g}/{scales[1]:g}, batch {args.batch} -> {args.out}")

    def progress(done, total, seconds):
        if done % 4 == 0 or done == total:
            _say(f"  batch {done}/{total}, {done * args.batch / seconds:.1f} videos/s, "
                 f"ETA {seconds / done * (total - done):.0f} s")

    res = synthesize_records(teacher, prompts, args.out, batch=args.batch, first_unit_steps=first,
                             later_unit_steps=later, cfg_scales=scales, seed=args.seed,
                             process_index=args.process_index, process_count=args.process_count,
                             devices=args.devices, progress=progress)
    _write_sheet(teacher, Path(args.out))
    _say(f"wrote {res['written']} records ({res['skipped']} already there, {res['devices']} device(s) per batch) to "
         f"{Path(args.out) / 'records'}; train "
         f"with: neodragon train dmd --records {Path(args.out) / 'records'}")
    return 0


def _write_sheet(pipe, out: Path, n: int = 8) -> None:
    import numpy as np

    from neodragon_jax.data.video_io import to_uint8_frames, write_png
    from neodragon_jax.eval.report import labelled_sheet

    files = sorted((out / "records").glob("*.npz"))[:n]
    if not files:
        return
    videos, labels = [], []
    for f in files:
        with np.load(f) as z:
            video = np.asarray(pipe.decode(np.asarray(z["latents"])[None]))[0]
            videos.append(to_uint8_frames(video))
            labels.append(str(z["caption"]))
    write_png(labelled_sheet(videos, labels), out / "sheet.png")


# ------------------------------------------------------------------------------------------------ dmd
def run_dmd(args) -> int:
    return _guard(lambda: {"eval": _eval, "export": _export}[args.action](args), f"dmd {args.action}")


def load_generator(run_dir: str, *, use_ema: bool = True):
    """``(teacher pipeline, generator pipeline, run config)`` of a dmd run."""
    import train.stages  # noqa: F401  (registers the stages' settings, which a run's config.json holds)
    from neodragon_jax.config import from_json
    from neodragon_jax.models.mmdit.model import prune
    from train.weights import assign, load_weights

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise DMDError(f"{run_dir} is not a training run: no config.json in it")
    cfg = from_json(cfg_path.read_text())
    if cfg.train.stage != "dmd":
        raise DMDError(f"{run_dir} is a run of stage {cfg.train.stage!r}, not 'dmd'")
    s = cfg.stages.get_settings("dmd")
    teacher_spec = s.teacher
    if teacher_spec.startswith("release:"):
        targs = argparse.Namespace(model=teacher_spec[len("release:"):], checkpoint=None, config=None, overrides=[])
        teacher = load_teacher(targs)
    elif teacher_spec.startswith("official:"):
        from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

        folder = teacher_spec[len("official:"):]
        if not Path(folder).is_dir():
            raise DMDError(f"the run's teacher folder {folder!r} is gone")
        teacher = TextToVideoPipeline.from_official(folder, cfg)
    else:
        raise DMDError(f"the run's teacher {teacher_spec!r} is not a release or an official folder")
    n = len(teacher.mmdit.transformer_blocks)
    kept = tuple(s.generator_blocks) or tuple(range(n))
    mmdit = prune(teacher.mmdit, kept)
    ema = ":ema" if use_ema and cfg.optim.ema_decay > 0 else ""
    assign(mmdit, load_weights(f"run:{run}{ema}#generator", mmdit))
    gcfg = dataclasses.replace(teacher.cfg, model=dataclasses.replace(teacher.cfg.model, mmdit=mmdit.cfg))
    gen = teacher.replace(cfg=gcfg, mmdit=mmdit, source=f"dmd run {run} ({'EMA' if ema else 'raw'} generator)")
    return teacher, gen, cfg


def _hybrid(teacher, gen, prompts, first_teacher, later_gen):
    """The teacher's multi-step first latent frame, then the generator for the later units (no CFG)."""
    import numpy as np

    from neodragon_jax.eval.heldout import HeldoutResult
    from neodragon_jax.eval.scorer import chance_level, score_pairs
    from neodragon_jax.pipelines.text_to_video import GenerationRequest

    s = teacher.cfg.sampling
    videos, denoise, nfe, t0 = [], [], 0, time.perf_counter()
    for i, p in enumerate(prompts):
        one = teacher.generate(GenerationRequest(prompt=p, seed=i, num_frames=1, first_unit_steps=first_teacher,
                                                 later_unit_steps=first_teacher,
                                                 cfg_scales=(s.first_unit_cfg, s.later_unit_cfg)))
        first = np.asarray(one.latents)[None, :, :1]
        res = gen.generate(GenerationRequest(prompt=p, seed=i, first_unit_steps=later_gen, later_unit_steps=later_gen,
                                             cfg_scales=(0.0, 0.0)), first_frame_latent=first)
        videos.append(res.frames)
        denoise.append(one.timings["denoise"] + res.timings["denoise"])
        nfe = one.nfe + res.nfe
    report = score_pairs(zip(videos, prompts))
    chance = chance_level([v.analysis for v in report.videos], list(prompts))
    name = f"hybrid: teacher first frame {'-'.join(map(str, first_teacher))} cfg {s.first_unit_cfg:g}, then 1-1-1"
    return HeldoutResult(name, list(prompts), videos, report, chance, nfe,
                         (time.perf_counter() - t0) / max(len(prompts), 1), denoise)


def _eval(args) -> int:
    from neodragon_cli.prune import _evaluate, _score_row
    from neodragon_jax.data.video_io import write_png
    from neodragon_jax.eval.heldout import heldout_prompts
    from neodragon_jax.eval.report import labelled_sheet
    from neodragon_jax.pipelines.text_to_video import ScheduleError, parse_schedule

    teacher, gen, _ = load_generator(args.run, use_ema=not args.raw)
    out = Path(args.out or Path(args.run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    prompts = heldout_prompts(args.prompts)
    s = teacher.cfg.sampling
    one, four = (1, 1, 1), (4, 4, 4)
    extra = []
    for text in args.teacher_schedule:
        try:
            first, later = parse_schedule(text, teacher.cfg.pyramid.num_stages)
        except ScheduleError as e:
            raise PruneError(f"--teacher-schedule {text!r}: {e}") from None
        extra.append((f"teacher {text}", teacher, first, later, (s.first_unit_cfg, s.later_unit_cfg)))
    runs = [
        ("teacher", teacher, tuple(s.first_unit_steps), tuple(s.later_unit_steps), (s.first_unit_cfg, s.later_unit_cfg)),
        *extra,
        ("teacher 1-1-1", teacher, one, one, (0.0, 0.0)),
        ("DMD 1-1-1", gen, one, one, (0.0, 0.0)),
        ("DMD 4-4-4", gen, four, four, (0.0, 0.0)),
    ]
    results, rows = {}, []
    cache = video_cache(args)
    for label, pipe, first, later, scales in runs:
        results[label] = _evaluate(pipe, prompts, first, later, scales, label, cache)
    results["hybrid"] = _hybrid(teacher, gen, prompts, tuple(s.first_unit_steps), one)
    base = results["teacher"]
    for label, res in results.items():
        row = _score_row(label, res)
        ref = sum(base.report.accuracy[a] for a in KEPT_ATTRIBUTES)
        row["kept_share"] = sum(res.report.accuracy[a] for a in KEPT_ATTRIBUTES) / ref if ref else None
        row["nfe_ratio"] = base.nfe / res.nfe if res.nfe else None
        # against each extra teacher schedule: (its NFE / this row's, this row's accuracy share of its)
        for ref_label, *_ in extra:
            ref_res = results[ref_label]
            ref_sum = sum(ref_res.report.accuracy[a] for a in KEPT_ATTRIBUTES)
            row.setdefault("against", {})[ref_label] = {
                "nfe_ratio": ref_res.nfe / res.nfe if res.nfe else None,
                "kept_share": sum(res.report.accuracy[a] for a in KEPT_ATTRIBUTES) / ref_sum if ref_sum else None}
        rows.append(row)
        _say(f"{label}: {_acc(res)}, NFE {res.nfe}, {res.seconds_per_video:.3f} s per video")
    k = min(8, len(prompts))
    videos, labels = [], []
    for i in range(k):
        for label, res in results.items():
            videos.append(res.videos[i])
            labels.append(f"{label}: {prompts[i]}" if label == "teacher" else f"{label} (same seed)")
    write_png(labelled_sheet(videos, labels), out / "dmd_sheet.png")
    result = {"run": str(args.run), "generator": gen.source, "teacher": teacher.source, "prompts": len(prompts),
              "rows": rows, "sheet": "dmd_sheet.png"}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    _write_report(out / "report.md", result)
    _say(f"wrote {out / 'report.md'} and eval.json")
    return 0


def _write_report(path: Path, r: dict) -> None:
    from neodragon_jax.eval.report import markdown_table

    attrs = ("colour", "motion", "shape")
    header = (["model", "schedule", "NFE"] + [f"{a} (chance)" for a in attrs]
              + ["kept of teacher (colour+motion)", "s per video"])
    rows = [[row["label"], row["schedule"], row["nfe"]]
            + [f"{row['accuracy'][a]:.3f} ({row['chance'][a]:.3f})" for a in attrs]
            + ["n/a" if row["kept_share"] is None else f"{row['kept_share']:.1%}", f"{row['seconds_per_video']:.3f}"]
            for row in r["rows"]]
    against = sorted({ref for row in r["rows"] for ref in row.get("against", {})})
    extra = []
    for ref in against:
        extra += ["", f"Against **{ref}** (NFE ratio = its NFE / the row's; kept = (colour + motion) / its):", "",
                  markdown_table(["model", "NFE", "NFE ratio", "kept"], [
                      [row["label"], row["nfe"], f"{row['against'][ref]['nfe_ratio']:.1f}x",
                       f"{row['against'][ref]['kept_share']:.1%}"] for row in r["rows"]])]
    path.write_text("\n".join([
        f"# Pyramidal DMD: {r['generator']}", "",
        f"Teacher {r['teacher']}; {r['prompts']} held-out prompts (triples never seen in training), seeds "
        f"0..{r['prompts'] - 1}. 'kept of teacher' = (colour + motion accuracy) / the teacher's with its full "
        f"schedule and CFG. Watch motion and colour separately for the collapse DMD peers report (static or "
        f"single-colour videos).", "", markdown_table(header, rows), *extra, "",
        "![teacher, teacher 1-1-1, DMD 1-1-1, DMD 4-4-4, hybrid; same prompts and seeds](dmd_sheet.png)", ""]))


def _export(args) -> int:
    from export.convert import Components, jax_to_official_folder

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DMDError(f"--out {out} exists; pass --overwrite to replace it")
    teacher, gen, _ = load_generator(args.run, use_ema=not args.raw)
    folder = jax_to_official_folder(Components(gen.text, gen.mmdit, gen.vae, gen.tokenizers), out,
                                    overwrite=args.overwrite)
    _say(f"wrote {folder}: generate with neodragon generate --checkpoint {folder} --config {teacher.cfg.name} "
         f"--schedule 1-1-1 --cfg 0")
    return 0
