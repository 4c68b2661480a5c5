"""`neodragon text-distill ...`: the prompt corpus, the teacher-target cache, evaluation, export and the ablation
of Neodragon's text-encoder distillation (training itself is `neodragon train text-distill`; train/text_distill.py).

* ``corpus``: a prompt corpus folder from text / JSONL files (deduplicated, held-out split) or, with
  ``--tiny N``, the synthetic domain's captions (held-out prompts from held-out triples);
* ``cache``: pre-extract the teacher targets ``CE(T5(p))`` of a corpus once (resumable);
* ``eval --run DIR``: held-out token MSE / cosine against the teacher, sizes and FLOPs per prompt, and the
  downstream effect (the teacher MMDiT generating the same held-out prompts and seeds from the student's
  tokens and from the teacher's, both scored by the strict scorer beside its chance level) into
  ``DIR/report.md`` with contact sheets;
* ``export --run DIR --out FOLDER``: the official Neodragon folder (``text_encoder_3`` = DT5,
  ``context_adapter`` = CA, the teacher's MMDiT without its CE, VAE, CLIPs and tokenizers);
* ``ablate --workdir DIR``: the tiny-domain recipe (corpus, DT5 pre-distillation, the cache, every mode and
  ``w_cd = 0``, evaluation) with one report comparing them.

User errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

DOWNSTREAM_DEFAULT = 96
SHEET_ROWS = 8
ABLATION = ("replace", "extend", "lora", "train-dt5", "replace-wcd0")


class TDError(Exception):
    """A user error: one line, exit status 2."""


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)

    c = sub.add_parser("corpus", help="write a prompt corpus folder (train.jsonl, heldout.jsonl, corpus.json)")
    c.add_argument("--out", required=True, help="corpus folder to write")
    c.add_argument("sources", nargs="*", help="prompt files: .txt (one per line) or .jsonl (a text field)")
    c.add_argument("--heldout-from", action="append", default=[], metavar="FILE",
                   help="files of held-out prompts (removed from training); default: a seeded hash split")
    c.add_argument("--heldout-fraction", type=float, default=0.01, help="hash split fraction (default 0.01)")
    c.add_argument("--tiny", type=int, default=None, metavar="N",
                   help="instead: N captions of the synthetic domain from its training triples")
    c.add_argument("--heldout", type=int, default=128, help="with --tiny: held-out prompts (held-out triples)")
    c.add_argument("--seed", type=int, default=0)

    k = sub.add_parser("cache", help="pre-extract the teacher targets of a corpus (resumable)")
    _config_args(k)
    k.add_argument("--corpus", required=True, help="corpus folder (data.path)")

    e = sub.add_parser("eval", help="held-out token metrics, sizes, downstream generation + scores -> report.md")
    e.add_argument("--run", required=True, help="a text-distill run folder")
    e.add_argument("--prompts", type=int, default=0, help="held-out prompts for the token metrics (0: all)")
    e.add_argument("--downstream", type=int, default=DOWNSTREAM_DEFAULT,
                   help=f"held-out prompts to generate with teacher and student tokens (default {DOWNSTREAM_DEFAULT}; "
                        f"0: skip)")
    e.add_argument("--teacher", default=None,
                   help="the teacher pipeline: a release name, an official folder, or 'random' (the run's random "
                        "towers in a random pipeline: a smoke test); default: from the run's teacher_init")
    e.add_argument("--schedule", default=None, help="sampling schedule (default: the teacher's config)")
    e.add_argument("--raw", action="store_true", help="the raw trained weights instead of the EMA")
    e.add_argument("--out", default=None, help="report folder (default: the run folder)")

    x = sub.add_parser("export", help="write the official Neodragon folder of a run's student")
    x.add_argument("--run", required=True, help="a text-distill run folder")
    x.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    x.add_argument("--teacher", default=None, help="the teacher pipeline (release name or official folder)")
    x.add_argument("--dtype", default=None, help="storage dtype: official, float32, bfloat16, float16 (default: keep)")
    x.add_argument("--raw", action="store_true", help="the raw trained weights instead of the EMA")
    x.add_argument("--overwrite", action="store_true")

    a = sub.add_parser("ablate", help="the tiny-domain recipe: corpus, DT5 pre-distillation, cache, every mode, "
                                      "w_cd=0, evaluation, one report")
    _config_args(a, default="tiny-teacher")
    a.add_argument("--workdir", default="runs/text-distill", help="recipe folder (default runs/text-distill)")
    a.add_argument("--prompts", type=int, default=20000, help="training prompts of the tiny corpus")
    a.add_argument("--heldout", type=int, default=128, help="held-out prompts")
    a.add_argument("--steps", type=int, default=3000, help="steps of each mode's run")
    a.add_argument("--pretrain-steps", type=int, default=4000, help="steps of the DT5 pre-distillation")
    a.add_argument("--batch", type=int, default=64, help="global batch")
    a.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine, 100 warmup steps)")
    a.add_argument("--modes", default=",".join(ABLATION), help=f"runs to make (default {','.join(ABLATION)})")
    a.add_argument("--downstream", type=int, default=DOWNSTREAM_DEFAULT,
                   help="held-out prompts generated per evaluated mode (0: token metrics only)")
    a.add_argument("--downstream-modes", default="replace", help="modes whose videos are generated (default replace)")
    a.add_argument("--teacher", default=None, help="teacher pipeline for the downstream part (default: the release)")


def _config_args(p, default: str = "tiny-teacher") -> None:
    p.add_argument("--config", default=default, help=f"preset or .toml (default {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (stage settings: stages.text-distill.FIELD=VALUE)")


def run(args) -> int:
    from neodragon_jax.config import ConfigError
    from neodragon_jax.convert.keymap import CheckpointMismatchError
    from neodragon_jax.data.video_folder import DatasetError

    actions = {"corpus": cmd_corpus, "cache": cmd_cache, "eval": cmd_eval, "export": cmd_export,
               "ablate": cmd_ablate}
    try:
        return actions[args.action](args)
    except (TDError, DatasetError, FileNotFoundError, ConfigError, CheckpointMismatchError) as e:
        print(f"neodragon text-distill {args.action}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from neodragon_jax.pipelines.text_to_video import ScheduleError
        from neodragon_jax.releases import ReleaseError
        from train.roles import RoleError
        from train.weights import WeightSourceError

        if isinstance(e, (RoleError, WeightSourceError, ReleaseError, ScheduleError)):
            print(f"neodragon text-distill {args.action}: {e}", file=sys.stderr)
            return 2
        if "text-distill" in str(e) or "is not a training run" in str(e) or "is a run of stage" in str(e):
            print(f"neodragon text-distill {args.action}: {e}", file=sys.stderr)
            return 2
        raise


# ---------------------------------------------------------------------------------------------- corpus
def cmd_corpus(args) -> int:
    from neodragon_jax.data.prompts import build_corpus, write_tiny_corpus

    t0 = time.perf_counter()
    if args.tiny is not None:
        if args.sources:
            raise TDError("give prompt files or --tiny N, not both")
        corpus = write_tiny_corpus(args.out, num_train=args.tiny, num_heldout=args.heldout, seed=args.seed)
    else:
        if not args.sources:
            raise TDError("no prompt files given (or --tiny N for the synthetic domain)")
        corpus = build_corpus(args.sources, args.out, heldout=args.heldout_from,
                              heldout_fraction=args.heldout_fraction, seed=args.seed)
    dup = corpus.record.get("duplicates_removed")
    _say(f"corpus {args.out}: {len(corpus.train)} training and {len(corpus.heldout)} held-out prompts"
         + (f", {dup} duplicates removed" if dup else "") + f" ({time.perf_counter() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------- cache
def _stage_config(args, extra=()):
    from neodragon_jax.config import load_config

    overrides = [o for item in args.overrides for o in item.split()] + list(extra)
    return load_config(args.config, ["train.stage=text-distill", *overrides])


def cmd_cache(args) -> int:
    from train.text_distill import TextDistill, build_target_cache, with_settings

    if not Path(args.corpus).exists():
        raise TDError(f"--corpus {args.corpus!r} does not exist")
    cfg = _stage_config(args, [f'data.path="{Path(args.corpus).absolute()}"'])
    cfg = with_settings(cfg, targets="cache")
    stage = TextDistill(cfg)
    t0 = time.perf_counter()
    cache = build_target_cache(stage, cfg, say=_say)
    _say(f"target cache {cache.folder}: {cache.rows} prompts x {cfg.model.text.max_length} tokens x "
         f"{stage.dims(cfg)['target']} ({cache.dtype}), complete ({time.perf_counter() - t0:.1f} s). Train from it "
         f"with --set stages.text-distill.targets=cache --set stages.text-distill.cache_dir={cache.folder}")
    return 0


# ------------------------------------------------------------------------------------------------ eval
def teacher_pipeline(run, spec: str | None):
    """The teacher text-to-video pipeline for the run: ``spec`` = a release name, an official folder or
    ``random``; default from the run's ``teacher_init``. None when there is none (a random-teacher run)."""
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
    from train.weights import parse_source

    if spec is None:
        src = parse_source(run.stage.settings.embedder_init or run.stage.settings.teacher_init)
        if src.kind == "release":
            spec = src.path
        elif src.kind == "official":
            spec = src.path
        else:
            return None
    if spec == "random":
        pipe = TextToVideoPipeline.random(dataclasses.replace(run.cfg, stages=run.cfg.stages), seed=0)
        pipe.text.t5 = run.models["t5"]
        pipe.mmdit.context_embedder = run.models["embedder"].context_embedder
        return pipe
    if Path(spec).is_dir():
        cfg = run.cfg
        return TextToVideoPipeline.from_official(spec, cfg)
    from neodragon_jax.releases import get_release

    rel = get_release(spec)
    rel.verify()
    return TextToVideoPipeline.from_official(rel.folder, rel.config(), transformer=rel.transformer)


def student_pipeline(teacher, run):
    """The teacher pipeline with the student's text stack in its Neodragon form and the teacher MMDiT minus its
    context embedder (the very same blocks and weights)."""
    from flax import nnx

    from neodragon_jax.models.mmdit.model import prune
    from neodragon_jax.models.text.conditioner import TextConditioner
    from train.text_distill import neodragon_form

    dt5, ca, neo = neodragon_form(run.stage, run.models, run.cfg)
    neo = dataclasses.replace(teacher.cfg.model.text, kind="neodragon", distil_t5=neo.distil_t5,
                              context_adapter=neo.context_adapter)
    text = nnx.eval_shape(lambda: TextConditioner(neo, rngs=nnx.Rngs(0)))
    text.clip_l, text.clip_g = teacher.text.clip_l, teacher.text.clip_g
    text.distil_t5, text.context_adapter = dt5, ca
    mmdit = prune(teacher.mmdit, range(len(teacher.mmdit.transformer_blocks)), keep_context_embedder=False)
    model = dataclasses.replace(teacher.cfg.model, text=neo, mmdit=mmdit.cfg)
    cfg = dataclasses.replace(teacher.cfg, model=model)
    return teacher.replace(cfg=cfg, text=text, mmdit=mmdit, random_weights=teacher.random_weights,
                           source=f"{teacher.source} + student text of {run.folder}")


def _frames_dir(out: Path, key: dict) -> Path:
    import hashlib

    d = out / "videos" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    d.mkdir(parents=True, exist_ok=True)
    (d / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    return d


def generate_all(pipe, prompts, folder: Path, label: str, *, schedule=None):
    """Frames of every prompt (seed = its index); each video saved as ``NNN.npy`` and reused on a rerun."""
    import numpy as np

    from neodragon_jax.pipelines.text_to_video import GenerationRequest, parse_schedule

    steps = parse_schedule(schedule, pipe.cfg.pyramid.num_stages) if schedule else (None, None)
    out = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        f = folder / f"{i:03d}.npy"
        if f.is_file():
            out.append(np.load(f))
            continue
        res = pipe.generate(GenerationRequest(prompt=p, seed=i, first_unit_steps=steps[0], later_unit_steps=steps[1]))
        np.save(folder / f".{i:03d}.tmp.npy", res.frames)
        (folder / f".{i:03d}.tmp.npy").replace(f)
        out.append(res.frames)
        if (i + 1) % 16 == 0 or i + 1 == len(prompts):
            _say(f"  [{label}] {i + 1}/{len(prompts)} videos ({time.perf_counter() - t0:.0f} s)")
    return out


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def downstream(run, teacher, prompts, out: Path, *, schedule=None) -> dict:
    """Generate ``prompts`` (seeds 0..N-1) with the teacher's and the student's tokens; score both."""
    import numpy as np

    from neodragon_jax.eval.report import labelled_sheet
    from neodragon_jax.eval.scorer import chance_level, score_pairs
    from neodragon_jax.data.video_io import write_png

    student = student_pipeline(teacher, run)
    base = {"teacher": teacher.source, "schedule": schedule, "sampling": dataclasses.asdict(teacher.cfg.sampling)}
    tdir = _frames_dir(out, {**base, "who": "teacher"})
    sdir = _frames_dir(out, {**base, "who": "student", "run": str(run.folder), "step": run.step,
                             "weights": run.weights, "mode": run.stage.settings.mode})
    tv = generate_all(teacher, prompts, tdir, "teacher tokens", schedule=schedule)
    sv = generate_all(student, prompts, sdir, "student tokens", schedule=schedule)
    scores = {"teacher tokens": score_pairs(zip(tv, prompts)), "student tokens": score_pairs(zip(sv, prompts))}
    chance = {k: chance_level([v.analysis for v in sc.videos], list(prompts)) for k, sc in scores.items()}
    n = min(SHEET_ROWS, len(prompts))
    videos = [v for pair in zip(tv[:n], sv[:n]) for v in pair]
    labels = [x for p in prompts[:n] for x in (f"teacher tokens: {p}", "student tokens (same seed)")]
    write_png(labelled_sheet(videos, labels), out / "text_distill_sheet.png")
    psnr = [_psnr(a, b) for a, b in zip(tv, sv)]
    return {"prompts": len(prompts), "scores": {k: v.to_dict() for k, v in scores.items()}, "chance": chance,
            "psnr_student_vs_teacher_db": float(np.mean(psnr)), "sheet": "text_distill_sheet.png",
            "teacher": teacher.source, "schedule": schedule or "config"}


def evaluate_run(run_dir, *, prompts: int = 0, downstream_n: int = DOWNSTREAM_DEFAULT, teacher: str | None = None,
                 schedule: str | None = None, use_ema: bool = True, out: str | None = None, run=None) -> dict:
    """Token metrics, sizes and (if a teacher pipeline exists) the downstream scores of a run; writes
    ``report.md`` / ``report.json`` into ``out`` (default the run folder) and returns the JSON."""
    from neodragon_jax.data.prompts import load_corpus
    from train.text_distill import load_run, neodragon_form, text_costs, token_metrics

    run = run or load_run(run_dir, use_ema=use_ema)
    out = Path(out or run.folder)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(run.cfg.data.path)
    held = list(corpus.heldout)
    if not held:
        raise TDError(f"the run's corpus {run.cfg.data.path} has no held-out prompts to evaluate on")
    t0 = time.perf_counter()
    tm = token_metrics(run.stage, run.models, run.cfg, held[: prompts or None])
    neg = token_metrics(run.stage, run.models, run.cfg, [run.cfg.sampling.negative_prompt or ""])
    tm["cos_negative_prompt"] = neg["cos"]
    _, _, neo = neodragon_form(run.stage, run.models, run.cfg)
    result = {"run": str(run.folder), "step": run.step, "weights": run.weights,
              "settings": dataclasses.asdict(run.stage.settings), "corpus": {
                  "path": run.cfg.data.path, "train": len(corpus.train), "heldout": len(corpus.heldout)},
              "tokens": tm, "costs": text_costs(run.cfg, neo), "downstream": None}
    _say(f"[eval] {run.folder.name}: held-out token cos {tm['cos']:.4f}, mse {tm['mse']:.4g} on {tm['prompts']} "
         f"prompts ({time.perf_counter() - t0:.1f} s)")
    if downstream_n > 0 and run.stage.settings.mode != "pretrain-dt5":
        pipe = teacher_pipeline(run, teacher)
        if pipe is None:
            result["downstream_skipped"] = ("the run's teacher is not a release or an official folder; pass "
                                            "--teacher (a release name, an official folder or 'random')")
        else:
            if len(held) < downstream_n:
                _say(f"[eval] only {len(held)} held-out prompts for --downstream {downstream_n}")
            result["downstream"] = downstream(run, pipe, held[:downstream_n], out, schedule=schedule)
    (out / "report.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_report(out / "report.md", result)
    return result


def _g(x: float) -> str:
    return f"{x / 1e9:.3f}" if x >= 1e7 else f"{x / 1e6:.3f} M"


def size_rows(costs: dict) -> list[list]:
    t, s = costs["teacher (T5 + CE)"], costs["student (DT5 + CA)"]
    rows = [[k, f"{v['params']:,}", f"{v['flops'] / 1e6:,.2f}"] for k, v in costs.items()]
    rows.append(["teacher / student", f"{t['params'] / s['params']:.2f}x", f"{t['flops'] / s['flops']:.2f}x"])
    return rows


def downstream_rows(d: dict) -> list[list]:
    t, s = d["scores"]["teacher tokens"], d["scores"]["student tokens"]
    ct, cs = d["chance"]["teacher tokens"], d["chance"]["student tokens"]
    rows = []
    for a in t["accuracy"]:
        ta, sa = t["accuracy"][a], s["accuracy"].get(a)
        rows.append([a, ta, ct.get(a), sa, cs.get(a), (sa / ta) if ta and sa is not None else None])
    ta, sa = t["all_correct"], s["all_correct"]
    rows.append(["all correct", ta, None, sa, None, (sa / ta) if ta else None])
    return rows


DOWNSTREAM_HEADER = ["attribute", "teacher tokens", "chance", "student tokens", "chance", "student / teacher"]


def write_report(path: Path, r: dict) -> Path:
    from neodragon_jax.eval.report import MarkdownReport

    s = r["settings"]
    rep = MarkdownReport(path, f"Text-encoder distillation: {Path(r['run']).name}")
    rep.paragraph(f"Mode `{s['mode']}`, loss {s['w_mse']:g} x MSE + {s['w_cd']:g} x (1 - cos) over valid tokens; "
                  f"teacher `{s['teacher_init']}`, DT5 from `{s['dt5_init']}`; step {r['step']} ({r['weights']} "
                  f"weights); corpus `{r['corpus']['path']}`: {r['corpus']['train']} training and "
                  f"{r['corpus']['heldout']} held-out prompts.")
    rep.heading("Sizes (per prompt, batch 1, max_length tokens)")
    rep.table(["model", "parameters", "MFLOPs / prompt"], size_rows(r["costs"]))
    tm = r["tokens"]
    space = "T5(p)" if s["mode"] == "pretrain-dt5" else "CE(T5(p))"
    rep.heading(f"Held-out tokens against the teacher's {space}")
    rep.table(["prompts", "valid tokens", "MSE", "cosine", "worst prompt's cosine", "negative prompt's cosine"],
              [[tm["prompts"], tm["tokens"], f"{tm['mse']:.4g}", f"{tm['cos']:.4f}", f"{tm['cos_worst_prompt']:.4f}",
                f"{tm['cos_negative_prompt']:.4f}"]])
    d = r.get("downstream")
    rep.heading("Downstream: the teacher MMDiT from student tokens vs teacher tokens")
    if d is None:
        rep.paragraph(r.get("downstream_skipped") or "Not run (`--downstream 0`, or a pretrain-dt5 run).")
    else:
        rep.paragraph(f"{d['prompts']} held-out prompts (held-out attribute triples), seed = prompt index, teacher "
                      f"`{d['teacher']}`, schedule {d['schedule']}. Strict scorer accuracy per attribute; chance = the "
                      f"same videos against deranged captions (each column's own videos). Mean PSNR between the "
                      f"paired videos: "
                      f"{d['psnr_student_vs_teacher_db']:.1f} dB.")
        rep.table(DOWNSTREAM_HEADER, downstream_rows(d))
        rep.image(Path(path).parent / d["sheet"], d["sheet"], "teacher tokens (odd rows) vs student tokens (even rows)")
    return rep.write()


def cmd_eval(args) -> int:
    if not Path(args.run).is_dir():
        raise TDError(f"--run {args.run!r} is not a folder")
    if args.downstream < 0 or args.prompts < 0:
        raise TDError("--downstream and --prompts must be >= 0")
    r = evaluate_run(args.run, prompts=args.prompts, downstream_n=args.downstream, teacher=args.teacher,
                     schedule=args.schedule, use_ema=not args.raw, out=args.out)
    _say(f"report: {Path(args.out or args.run) / 'report.md'}")
    if r.get("downstream"):
        rows = downstream_rows(r["downstream"])
        _say("  " + "; ".join(f"{a}: teacher {t:.3f}, student {s:.3f}" + (f" (chance {c:.3f})" if c is not None else "")
                              for a, t, _, s, c, _ in rows))
    return 0


# ---------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from export.convert import Components, jax_to_official_folder
    from train.text_distill import load_run

    if Path(args.out).exists() and not args.overwrite:
        raise TDError(f"--out {args.out} exists; pass --overwrite to replace it")
    if not Path(args.run).is_dir():
        raise TDError(f"--run {args.run!r} is not a folder")
    run = load_run(args.run, use_ema=not args.raw)
    teacher = teacher_pipeline(run, args.teacher)
    if teacher is None:
        raise TDError("the run's teacher is not a release or an official folder: pass --teacher (the VAE, CLIPs and "
                      "MMDiT blocks of the Neodragon folder come from it)")
    student = student_pipeline(teacher, run)
    out = jax_to_official_folder(Components(student.text, student.mmdit, student.vae, student.tokenizers), args.out,
                                 dtype=args.dtype, overwrite=args.overwrite)
    (out / "text_distill.json").write_text(json.dumps({
        "run": str(run.folder), "step": run.step, "weights": run.weights, "teacher": teacher.source,
        "settings": dataclasses.asdict(run.stage.settings)}, indent=1, sort_keys=True) + "\n")
    _say(f"wrote {out}: text_encoder_3/ (DistilT5), context_adapter/ (ContextAdapter) and the teacher's other "
         f"components (its MMDiT without the context embedder). Load it with --checkpoint {out} --config "
         f"{teacher.cfg.name} --set model.text.kind=neodragon --set model.mmdit.context_in_dim=none")
    return 0


# ---------------------------------------------------------------------------------------------- ablate
def ablation_phases(args, modes: list[str]):
    from train.recipe import JobPhase, TrainPhase

    def corpus_job(ctx):
        from neodragon_jax.data.prompts import load_corpus, write_tiny_corpus

        if not (ctx.dir / "train.jsonl").is_file():
            write_tiny_corpus(ctx.dir, num_train=args.prompts, num_heldout=args.heldout)
        c = load_corpus(ctx.dir)
        return {"train": len(c.train), "heldout": len(c.heldout)}

    common = [f"train.steps={args.steps}", f"train.global_batch={args.batch}", f"optim.lr={args.lr}",
              "optim.warmup_steps=100", "train.log_every=500", "checkpoint.every_steps=1000",
              "stages.text-distill.ema=0.999"]

    def configure(extra, corpus="corpus", steps=None):
        def fn(base, inputs, settings):
            from neodragon_jax.config import apply_overrides

            more = [f'data.path="{inputs[corpus].dir}"', *common, *extra(inputs)]
            if steps is not None:
                more.append(f"train.steps={steps}")
            return apply_overrides(base, more)

        return fn

    def cache_job(ctx):
        from train.text_distill import TextDistill, build_target_cache, with_settings

        cfg = with_settings(ctx.cfg, targets="cache", cache_dir=str(ctx.dir / "targets"))
        cache = build_target_cache(TextDistill(cfg), cfg, say=ctx.say)
        return {"folder": str(cache.folder), "rows": cache.rows}

    phases = [
        JobPhase("corpus", corpus_job, settings={"prompts": args.prompts, "heldout": args.heldout}),
        TrainPhase("pretrain-dt5", "text-distill", inputs=("corpus",), configure=configure(
            lambda i: ["stages.text-distill.mode=pretrain-dt5"], steps=args.pretrain_steps)),
        JobPhase("cache", cache_job, inputs=("corpus",), uses=("model", "precision", "sampling", "stages", "data",
                                                              "train.role_init", "train.seed"),
                 configure=lambda base, inputs, s: _cache_cfg(base, inputs)),
    ]
    for name in modes:
        mode = "replace" if name == "replace-wcd0" else name

        def extra(inputs, mode=mode, name=name):
            out = [f"stages.text-distill.mode={mode}", "stages.text-distill.targets=cache",
                   f'stages.text-distill.cache_dir="{inputs["cache"].results["folder"]}"',
                   f'stages.text-distill.dt5_init="run:{inputs["pretrain-dt5"].dir}:ema#dt5"']
            if name == "replace-wcd0":
                out.append("stages.text-distill.w_cd=0.0")
            return out

        phases.append(TrainPhase(name, "text-distill", inputs=("corpus", "pretrain-dt5", "cache"),
                                 configure=configure(extra)))
    return phases


def _cache_cfg(base, inputs):
    from neodragon_jax.config import apply_overrides

    return apply_overrides(base, [f'data.path="{inputs["corpus"].dir}"'])


def cmd_ablate(args) -> int:
    from train.recipe import run_recipe

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ABLATION]
    if bad or not modes:
        raise TDError(f"--modes {args.modes!r}: choose from {','.join(ABLATION)}")
    down = [m.strip() for m in args.downstream_modes.split(",") if m.strip()]
    for n in ("prompts", "heldout", "steps", "pretrain_steps", "batch"):
        if getattr(args, n) < 1:
            raise TDError(f"--{n.replace('_', '-')} must be >= 1")
    base = _stage_config(args)
    workdir = Path(args.workdir).absolute()
    t0 = time.perf_counter()
    records = run_recipe(ablation_phases(args, modes), base, workdir, say=_say, run_kwargs={"console": True})
    rows, results = [], {}
    for name in ["pretrain-dt5", *modes]:
        rec = records[name]
        n = args.downstream if name in down else 0
        res = evaluate_run(rec.dir, downstream_n=n, teacher=args.teacher)
        results[name] = res
        rows.append(res)
    write_ablation(workdir / "report.md", results, args)
    _say(f"ablation report: {workdir / 'report.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def write_ablation(path: Path, results: dict, args) -> Path:
    from neodragon_jax.eval.report import MarkdownReport

    rep = MarkdownReport(path, "Text-encoder distillation on the tiny domain: modes and w_cd")
    first = next(iter(results.values()))
    costs = first["costs"]
    rep.paragraph(f"Teacher `{first['settings']['teacher_init']}`; corpus {first['corpus']['train']} training / "
                  f"{first['corpus']['heldout']} held-out prompts (held-out attribute triples); batch {args.batch}, "
                  f"{args.steps} steps per mode after {args.pretrain_steps} steps of DT5 pre-distillation "
                  f"(`pretrain-dt5`: DT5 alone against T5's own tokens, the stand-in for DistillT5's pretrained DT5; "
                  f"every mode starts from its DT5). Token metrics on all held-out prompts.")
    rep.heading("Sizes")
    rep.table(["model", "parameters", "MFLOPs / prompt"], size_rows(costs))
    rep.heading("Modes")
    rows = []
    for name, r in results.items():
        s, tm, d = r["settings"], r["tokens"], r.get("downstream")
        acc = "-"
        if d:
            t, st = d["scores"]["teacher tokens"], d["scores"]["student tokens"]
            acc = f"{st['all_correct']:.3f} / {t['all_correct']:.3f}"
        space = "T5" if s["mode"] == "pretrain-dt5" else "CE"
        rows.append([name, s["mode"], s["w_cd"], space, f"{tm['mse']:.4g}", f"{tm['cos']:.4f}",
                     f"{tm['cos_worst_prompt']:.4f}", acc, f"[report]({Path(r['run']).name}/report.md)"])
    rep.table(["run", "mode", "w_cd", "target space", "held-out MSE", "held-out cosine", "worst prompt",
               "all-correct student / teacher", "details"], rows)
    for name, r in results.items():
        if r.get("downstream"):
            rep.heading(f"Downstream ({name})", 3)
            rep.table(DOWNSTREAM_HEADER, downstream_rows(r["downstream"]))
            rep.image(Path(r["run"]) / r["downstream"]["sheet"], f"{name}_sheet.png", f"{name}: teacher vs student")
    return rep.write()
