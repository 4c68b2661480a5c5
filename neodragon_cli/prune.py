"""`neodragon prune ...`: Neodragon's block pruning (spec §6) around the recovery stages.

* ``importance``: BI_v / BI_t of every MMDiT block over a calibration set (prompts x samples), every denoising
  step of the schedule and both CFG branches -> ``importance.json`` + ``importance.png`` (both scores per
  block and their rank correlation);
* ``ablate``: every single-block removal generating the same held-out prompts and seeds, scored by the strict
  scorer beside chance, one contact sheet per removed block -> ``ablation.json`` / ``report.md``;
* ``select``: a kept-block list from a rule (lowest BI_v, lowest BI_t, a weighted combination, or explicit),
  always keeping the last block; writes the student (the kept teacher blocks with their teacher indices) as
  an official-layout folder: what ``neodragon train recover-flow`` starts from;
* ``eval``: the teacher beside pruned students (a pruned folder or a ``recover-flow`` / ``recover-distill``
  run) on held-out prompts: accuracy per attribute beside chance, the share of the teacher's accuracy kept,
  parameters, denoising time per model call (NFE) -> ``eval.json`` / ``report.md`` with contact sheets.

The teacher is a shipped release (``--model``, default tiny-teacher) or an official folder (``--checkpoint``
with ``--config``). User errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

SHEET_ROWS = 8
HELDOUT_DEFAULT = 96
#: The attributes the tiny teacher learnt (shape stays at chance in the shipped teacher; reported, not kept).
KEPT_ATTRIBUTES = ("colour", "motion")


class PruneError(Exception):
    """A user error: one line, exit status 2."""


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------- arguments
def _teacher_args(p) -> None:
    p.add_argument("--model", default=None, help="the teacher: a shipped release (default tiny-teacher)")
    p.add_argument("--checkpoint", default=None, help="or: the teacher's official folder (with --config)")
    p.add_argument("--config", default=None, help="preset or .toml for --checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. sampling.first_unit_cfg=0)")


def _schedule_args(p) -> None:
    p.add_argument("--schedule", default=None, help="steps per stage 'A-B-C' or 'A-B-C,D-E-F' (default: the config's)")
    p.add_argument("--cfg", default=None, help="CFG scales 'FIRST/LATER' or one number (default: the config's)")


def video_cache_arg(p) -> None:
    p.add_argument("--video-cache", default=None, metavar="DIR",
                   help="reuse generated videos kept in DIR (keyed by the weights, config, tokens, seed, steps and "
                        "guidance, so only an identical request hits); new ones are added")


def video_cache(args):
    from neodragon_jax.eval.video_cache import VideoCache

    return VideoCache(args.video_cache) if getattr(args, "video_cache", None) else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)

    i = sub.add_parser("importance", help="block importance BI_v / BI_t over a calibration set -> JSON + PNG")
    _teacher_args(i)
    _schedule_args(i)
    i.add_argument("--prompts", type=int, default=32, help="calibration prompts (training-domain captions)")
    i.add_argument("--samples", type=int, default=2, help="samples (seeds) per prompt")
    i.add_argument("--prompt-file", default=None, help="calibration prompts from a file (.txt lines or .jsonl text)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True, help="folder for importance.json / importance.png")

    a = sub.add_parser("ablate", help="single-block removals on held-out prompts: scores + one sheet per block")
    _teacher_args(a)
    _schedule_args(a)
    a.add_argument("--prompts", type=int, default=HELDOUT_DEFAULT, help=f"held-out prompts (default {HELDOUT_DEFAULT})")
    a.add_argument("--blocks", default=None, help="blocks to remove one at a time, e.g. 0,3 (default: all but the last)")
    video_cache_arg(a)
    a.add_argument("--out", required=True, help="report folder")

    s = sub.add_parser("select", help="kept blocks from a rule -> the pruned student as an official folder")
    _teacher_args(s)
    s.add_argument("--importance", default=None, help="importance.json (from `prune importance`)")
    s.add_argument("--rule", default="visual", choices=["visual", "text", "combined", "explicit"])
    s.add_argument("--remove", type=int, default=0, help="blocks to remove (default: 25%% of the blocks)")
    s.add_argument("--text-weight", type=float, default=0.5, help="rule combined: the weight of BI_t (0..1)")
    s.add_argument("--keep", default=None, help="rule explicit: kept block positions, e.g. 0,1,3,4,6,7")
    s.add_argument("--out", required=True, help="the student's official folder (refused if it exists)")
    s.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("eval", help="teacher vs pruned students on held-out prompts -> eval.json, report.md")
    _teacher_args(e)
    _schedule_args(e)
    e.add_argument("--student", action="append", default=[], metavar="LABEL=PATH",
                   help="a pruned folder or a recover-flow / recover-distill run (repeatable)")
    e.add_argument("--prompts", type=int, default=HELDOUT_DEFAULT, help=f"held-out prompts (default {HELDOUT_DEFAULT})")
    e.add_argument("--raw", action="store_true", help="runs: the raw trained weights instead of the EMA")
    video_cache_arg(e)
    e.add_argument("--out", required=True, help="report folder")


def run(args) -> int:
    from neodragon_jax.config import ConfigError
    from neodragon_jax.convert.keymap import CheckpointMismatchError

    actions = {"importance": cmd_importance, "ablate": cmd_ablate, "select": cmd_select, "eval": cmd_eval}
    try:
        return actions[args.action](args)
    except (PruneError, FileNotFoundError, FileExistsError, ConfigError, CheckpointMismatchError) as e:
        print(f"neodragon prune {args.action}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from neodragon_jax.pipelines.text_to_video import ScheduleError
        from neodragon_jax.releases import ReleaseError
        from train.pruning import PruningError
        from train.weights import WeightSourceError

        if isinstance(e, (PruningError, ScheduleError, ReleaseError, WeightSourceError)):
            print(f"neodragon prune {args.action}: {e}", file=sys.stderr)
            return 2
        raise


# ---------------------------------------------------------------------------------------------- models
def load_teacher(args):
    """The teacher ``TextToVideoPipeline`` from ``--model`` (release) or ``--checkpoint`` + ``--config``."""
    from neodragon_jax.config import load_config
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
    from neodragon_jax.releases import DEFAULT_TEACHER, get_release

    if args.model and args.checkpoint:
        raise PruneError("--model and --checkpoint exclude each other")
    if args.checkpoint:
        if not Path(args.checkpoint).is_dir():
            raise PruneError(f"--checkpoint {args.checkpoint!r} is not a folder")
        return TextToVideoPipeline.from_official(args.checkpoint, load_config(args.config or "tiny", args.overrides))
    if args.config:
        raise PruneError("--config goes with --checkpoint (a release brings its own config)")
    rel = get_release(args.model or DEFAULT_TEACHER)
    rel.verify()
    pipe = TextToVideoPipeline.from_official(rel.folder, rel.config(args.overrides), transformer=rel.transformer)
    return pipe.replace(source=f"release:{rel.name}")


def _steps(args, pipe):
    from neodragon_jax.pipelines.text_to_video import parse_cfg_scales, parse_schedule

    s = pipe.cfg.sampling
    first, later = (parse_schedule(args.schedule, pipe.cfg.pyramid.num_stages) if args.schedule
                    else (tuple(s.first_unit_steps), tuple(s.later_unit_steps)))
    scales = parse_cfg_scales(args.cfg, (s.first_unit_cfg, s.later_unit_cfg))
    return first, later, scales


def student_from_path(teacher, path: str, *, use_ema: bool = True):
    """``(pipeline, description)`` of a pruned student: an official folder from ``prune select`` or a
    recovery run (its latest checkpoint; the EMA when it has one)."""
    import train.stages  # noqa: F401  (registers the stages' settings, which a run's config.json holds)
    from neodragon_jax.models.mmdit.model import prune
    from train.pruning import is_recovery_run, pruned_folder_blocks, student_blocks
    from train.weights import assign, load_weights

    p = Path(path)
    if not p.is_dir():
        raise PruneError(f"student {path!r} is not a folder (a pruned folder or a recovery run)")
    n = len(teacher.mmdit.transformer_blocks)
    stage = is_recovery_run(p)
    if stage is None:
        kept = pruned_folder_blocks(p)
        spec = f"official:{p}"
        what = f"pruned folder {p}"
    else:
        from neodragon_jax.config import from_json

        cfg = from_json((p / "config.json").read_text())
        kept = student_blocks(cfg.stages.get_settings(stage), n)
        role = "mmdit" if stage == "recover-flow" else "student"
        ema = ":ema" if use_ema and cfg.optim.ema_decay > 0 else ""
        spec = f"run:{p}{ema}#{role}"
        what = f"{stage} run {p} ({'EMA' if ema else 'raw'} weights)"
    if kept[-1] != n - 1 or max(kept) >= n:
        raise PruneError(f"student {path!r} keeps blocks {list(kept)}, which do not fit the {n}-block teacher")
    mmdit = prune(teacher.mmdit, kept)
    assign(mmdit, load_weights(spec, mmdit))
    cfg = dataclasses.replace(teacher.cfg, model=dataclasses.replace(teacher.cfg.model, mmdit=mmdit.cfg))
    return teacher.replace(cfg=cfg, mmdit=mmdit, source=what), kept


def _params(mmdit) -> int:
    from neodragon_jax.convert.io import param_count

    return param_count(mmdit)


# ------------------------------------------------------------------------------------------ importance
def calibration_prompts(n: int, seed: int, prompt_file: str | None) -> list[str]:
    """Training-domain captions (never the held-out triples the evaluation scores)."""
    if prompt_file:
        from neodragon_jax.data.prompts import read_prompt_file

        if not Path(prompt_file).is_file():
            raise PruneError(f"--prompt-file {prompt_file!r} is not a file")
        prompts = list(dict.fromkeys(read_prompt_file(prompt_file)))
        if not prompts:
            raise PruneError(f"--prompt-file {prompt_file!r} holds no prompt")
        return prompts[:n] if n else prompts
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.data.synthetic import dataset_item

    train = split_combinations().train
    return [dataset_item(i, seed=1000 + seed, combinations=train, num_objects=1)[1] for i in range(n)]


def cmd_importance(args) -> int:
    from neodragon_jax.eval.block_importance import measure_importance, plot_importance

    if args.prompts < 1 or args.samples < 1:
        raise PruneError("--prompts and --samples must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args)
    first, later, scales = _steps(args, teacher)
    prompts = calibration_prompts(args.prompts, args.seed, args.prompt_file)
    _say(f"block importance of {teacher.source}: {len(prompts)} prompts x {args.samples} samples, schedule "
         f"{'-'.join(map(str, first))},{'-'.join(map(str, later))} cfg {scales[0]:g}/{scales[1]:g}")

    def progress(done, total, seconds):
        if done % 8 == 0 or done == total:
            eta = seconds / done * (total - done)
            _say(f"  {done}/{total} videos, {done / seconds:.2f} videos/s, ETA {eta:.0f} s")

    imp = measure_importance(teacher, prompts, samples_per_prompt=args.samples, first_unit_steps=first,
                             later_unit_steps=later, cfg_scales=scales, seed=args.seed, progress=progress)
    imp.calibration["teacher"] = teacher.source
    imp.write(out / "importance.json")
    plot_importance(imp, out / "importance.png")
    rows = [f"  block {k}: BI_v {v:.4f}  BI_t {'n/a' if t is None else f'{t:.4f}'}"
            for k, (v, t) in enumerate(zip(imp.visual, imp.text))]
    _say("\n".join(rows))
    rho = "n/a" if imp.rank_correlation is None else f"{imp.rank_correlation:+.2f}"
    _say(f"Spearman rho(BI_v, BI_t) = {rho}; wrote {out / 'importance.json'} and {out / 'importance.png'}")
    return 0


# ---------------------------------------------------------------------------------------------- ablate
def _score_row(label: str, res) -> dict:
    return {"label": label, **res.as_dict(), "denoise_ms_per_nfe": res.denoise_ms_per_nfe}


def _evaluate(pipe, prompts, first, later, scales, label, cache=None):
    from neodragon_jax.eval.heldout import evaluate_heldout

    t0 = time.perf_counter()
    hits0 = cache.hits if cache is not None else 0

    def progress(done, total):
        if done % 32 == 0 or done == total:
            s = time.perf_counter() - t0
            reused = f" ({cache.hits - hits0} read from the video cache)" if cache is not None else ""
            _say(f"  [{label}] {done}/{total} videos{reused}, {done / s:.2f} videos/s, "
                 f"ETA {s / done * (total - done):.0f} s")

    return evaluate_heldout(pipe, prompts, first_unit_steps=first, later_unit_steps=later, cfg_scales=scales,
                            progress=progress, cache=cache)


def _acc(res, attrs=KEPT_ATTRIBUTES) -> str:
    return ", ".join(f"{a} {res.report.accuracy[a]:.3f} (chance {res.chance[a]:.3f})" for a in attrs)


def cmd_ablate(args) -> int:
    from neodragon_jax.data.video_io import write_png
    from neodragon_jax.eval.heldout import heldout_prompts
    from neodragon_jax.eval.report import labelled_sheet
    from neodragon_jax.models.mmdit.model import prune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args)
    n = len(teacher.mmdit.transformer_blocks)
    if args.blocks:
        try:
            blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
        except ValueError:
            raise PruneError(f"--blocks {args.blocks!r}: expected comma-separated block positions") from None
    else:
        blocks = list(range(n - 1))
    bad = [b for b in blocks if not 0 <= b < n - 1]
    if bad:
        raise PruneError(f"--blocks {bad}: removable blocks are 0..{n - 2} (the last block is always kept)")
    first, later, scales = _steps(args, teacher)
    prompts = heldout_prompts(args.prompts)
    rows, sheets = [], {}
    cache = video_cache(args)
    res = _evaluate(teacher, prompts, first, later, scales, "teacher", cache)
    rows.append(_score_row("teacher", res) | {"removed": None})
    _say(f"teacher: {_acc(res)}")
    k = min(SHEET_ROWS, len(prompts))
    for b in blocks:
        kept = [i for i in range(n) if i != b]
        pipe = teacher.replace(mmdit=prune(teacher.mmdit, kept))
        r = _evaluate(pipe, prompts, first, later, scales, f"without block {b}", cache)
        rows.append(_score_row(f"without block {b}", r) | {"removed": b})
        labels = [x for p in prompts[:k] for x in (f"teacher: {p}", f"without block {b} (same seed)")]
        videos = [v for pair in zip(res.videos[:k], r.videos[:k]) for v in pair]
        sheets[b] = f"ablation_block{b}.png"
        write_png(labelled_sheet(videos, labels), out / sheets[b])
        _say(f"without block {b}: {_acc(r)}")
    result = {"teacher": teacher.source, "prompts": len(prompts), "schedule": res.schedule, "rows": rows,
              "sheets": sheets}
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_ablation(rows, out / "ablation.png")
    _write_ablation_report(out / "report.md", result)
    _say(f"wrote {out / 'report.md'}, ablation.json, ablation.png and {len(sheets)} contact sheets")
    return 0


def _plot_ablation(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    teacher = rows[0]
    ab = rows[1:]
    x = np.arange(len(ab))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ab) + 3), 3.4), dpi=120)
    w = 0.38
    for j, (attr, colour) in enumerate(zip(KEPT_ATTRIBUTES, ("#2b6cb0", "#dd6b20"))):
        ax.bar(x + (j - 0.5) * w, [r["accuracy"][attr] for r in ab], w, color=colour, label=f"{attr} without block")
        ax.axhline(teacher["accuracy"][attr], color=colour, ls="--", lw=1, label=f"{attr}, full teacher")
        ax.axhline(teacher["chance"][attr], color=colour, ls=":", lw=1, label=f"{attr} chance")
    ax.set_xticks(x, [str(r["removed"]) for r in ab])
    ax.set_xlabel("removed block")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"single-block removals, {teacher['videos']} held-out prompts ({teacher['schedule']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_ablation_report(path: Path, r: dict) -> None:
    from neodragon_jax.eval.report import markdown_table

    attrs = ("colour", "motion", "shape")
    header = ["model"] + [f"{a} (chance)" for a in attrs] + ["all correct"]
    rows = [[row["label"]] + [f"{row['accuracy'][a]:.3f} ({row['chance'][a]:.3f})" for a in attrs]
            + [f"{row['all_correct']:.3f}"] for row in r["rows"]]
    parts = [f"# Single-block removals of {r['teacher']}", "",
             f"{r['prompts']} held-out prompts (triples never seen in training), seeds 0..{r['prompts'] - 1}, "
             f"schedule {r['schedule']}; every removal generates the same prompts and seeds.", "",
             markdown_table(header, rows), "", "![accuracy per removed block](ablation.png)", ""]
    for b, sheet in r["sheets"].items():
        parts += [f"## Without block {b}", "", f"![teacher / without block {b}]({sheet})", ""]
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------- select
def cmd_select(args) -> int:
    from export.convert import Components, jax_to_official_folder
    from neodragon_jax.eval.block_importance import Importance, select_blocks
    from neodragon_jax.models.mmdit.model import prune

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PruneError(f"--out {out} exists; pass --overwrite to replace it")
    teacher = load_teacher(args)
    n = len(teacher.mmdit.transformer_blocks)
    imp = None
    if args.importance:
        if not Path(args.importance).is_file():
            raise PruneError(f"--importance {args.importance!r} is not a file (write it with `neodragon prune importance`)")
        try:
            imp = Importance.read(args.importance)
        except ValueError as e:
            raise PruneError(str(e)) from None
    explicit = ()
    if args.keep:
        if args.rule != "explicit":
            raise PruneError("--keep goes with --rule explicit")
        try:
            explicit = tuple(int(k) for k in args.keep.split(",") if k.strip())
        except ValueError:
            raise PruneError(f"--keep {args.keep!r}: expected comma-separated block positions") from None
    remove = args.remove or max(1, round(0.25 * n))
    try:
        kept = select_blocks(imp, n, remove=remove, rule=args.rule, text_weight=args.text_weight, explicit=explicit)
    except ValueError as e:
        raise PruneError(str(e)) from None
    student = prune(teacher.mmdit, kept)
    folder = jax_to_official_folder(Components(teacher.text, student, teacher.vae, teacher.tokenizers), out,
                                    overwrite=args.overwrite)
    record = {"teacher": teacher.source, "rule": args.rule, "kept": list(kept),
              "removed": [k for k in range(n) if k not in kept], "text_weight": args.text_weight,
              "importance": str(args.importance) if args.importance else None,
              "params": {"teacher_mmdit": _params(teacher.mmdit), "student_mmdit": _params(student)}}
    (folder / "prune.json").write_text(json.dumps(record, indent=1) + "\n")
    p = record["params"]
    _say(f"kept blocks {list(kept)} of {n} (removed {record['removed']}, rule {args.rule}); MMDiT parameters "
         f"{p['teacher_mmdit']:,} -> {p['student_mmdit']:,} ({p['student_mmdit'] / p['teacher_mmdit']:.1%}); wrote "
         f"{folder}. Recover it: neodragon train recover-flow --set stages.recover-flow.student={folder.resolve()} ...")
    return 0


# ------------------------------------------------------------------------------------------------ eval
def cmd_eval(args) -> int:
    from neodragon_jax.data.video_io import write_png
    from neodragon_jax.eval.heldout import heldout_prompts
    from neodragon_jax.eval.report import labelled_sheet

    if not args.student:
        raise PruneError("give at least one --student LABEL=PATH")
    students = []
    for entry in args.student:
        label, sep, path = entry.partition("=")
        if not sep or not label or not path:
            raise PruneError(f"--student {entry!r}: expected LABEL=PATH")
        students.append((label, path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args)
    pipes = [(label, *student_from_path(teacher, path, use_ema=not args.raw)) for label, path in students]
    first, later, scales = _steps(args, teacher)
    prompts = heldout_prompts(args.prompts)
    rows, results = [], {}
    n = len(teacher.mmdit.transformer_blocks)
    cache = video_cache(args)
    for label, pipe, kept in [("teacher", teacher, tuple(range(n)))] + pipes:
        res = _evaluate(pipe, prompts, first, later, scales, label, cache)
        results[label] = res
        rows.append(_score_row(label, res) | {"source": pipe.source, "kept": list(kept), "blocks": len(kept),
                                              "params": _params(pipe.mmdit)})
        _say(f"{label}: {_acc(res)}, {res.denoise_ms_per_nfe:.2f} ms per NFE")
    base = rows[0]
    for row in rows:
        row["kept_share"] = {a: (row["accuracy"][a] / base["accuracy"][a] if base["accuracy"][a] else None)
                             for a in KEPT_ATTRIBUTES}
        both = [row["accuracy"][a] for a in KEPT_ATTRIBUTES]
        ref = [base["accuracy"][a] for a in KEPT_ATTRIBUTES]
        row["kept_share"]["mean"] = sum(both) / sum(ref) if sum(ref) else None
    k = min(SHEET_ROWS, len(prompts))
    videos, labels = [], []
    for i in range(k):
        for label in results:
            videos.append(results[label].videos[i])
            labels.append(f"{label}: {prompts[i]}" if label == "teacher" else f"{label} (same seed)")
    write_png(labelled_sheet(videos, labels), out / "pruning_sheet.png")
    result = {"teacher": teacher.source, "prompts": len(prompts), "schedule": rows[0]["schedule"], "rows": rows,
              "sheet": "pruning_sheet.png"}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    _write_eval_report(out / "report.md", result)
    _say(f"wrote {out / 'report.md'} and eval.json")
    return 0


def _write_eval_report(path: Path, r: dict) -> None:
    from neodragon_jax.eval.report import markdown_table

    attrs = ("colour", "motion", "shape")
    header = (["model", "blocks", "MMDiT params"] + [f"{a} (chance)" for a in attrs]
              + ["kept of teacher (colour+motion)", "ms per NFE"])
    rows = []
    for row in r["rows"]:
        share = row["kept_share"]["mean"]
        rows.append([row["label"], row["blocks"], f"{row['params']:,}"]
                    + [f"{row['accuracy'][a]:.3f} ({row['chance'][a]:.3f})" for a in attrs]
                    + ["n/a" if share is None else f"{share:.1%}", f"{row['denoise_ms_per_nfe']:.2f}"])
    sources = [f"- **{row['label']}**: {row['source']}, kept blocks {row['kept']}" for row in r["rows"]]
    path.write_text("\n".join([
        f"# Pruned students against {r['teacher']}", "",
        f"{r['prompts']} held-out prompts (triples never seen in training), seeds 0..{r['prompts'] - 1}, schedule "
        f"{r['schedule']}. 'kept of teacher' = (colour + motion accuracy) / the teacher's; 'ms per NFE' = the median "
        f"denoising time per model call on this machine (compile excluded).", "",
        markdown_table(header, rows), "", *sources, "", "![teacher and students, same prompts and seeds](pruning_sheet.png)",
        ""]))
