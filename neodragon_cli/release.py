"""`neodragon release`: trained runs -> a shipped release (official folder layout + ``release.json``).

A teacher (Pyramid Flow layout) from the demo's runs::

    neodragon release --flow runs/demo/flow --vae runs/demo/vae --text runs/demo/text/params.npz \\
        --name tiny-teacher --description "..." [--step N] [--dtype float16] [--eval-prompts 96]

A Neodragon (DistilT5 + ContextAdapter, a pruned 1-1-1 MMDiT, the light decoder) from the runs of the four
techniques::

    neodragon release --text-distill RUN --decoder RUN --dmd RUN --name neodragon-tiny --schedules teacher

1. The models are restored: the VAE from its run (its latest checkpoint), the MMDiT from the flow run (its
   EMA weights when the run kept one; ``--step`` picks a checkpoint), the frozen text stack from its ``.npz``.
   The config is the flow run's own ``config.json`` (it holds the latent normalisation and every shape).
   A Neodragon release takes the dmd run's generator (its pruned blocks, no context embedder), the
   text-distill run's DistilT5 + ContextAdapter, the decoder run's light decoder beside the teacher's VAE
   encoder, and samples 1-1-1 without guidance (``sampling``, overridable with ``--set``); its record also
   holds its scores against the teacher release it was distilled from (kept share, NFE ratio).
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
    p.add_argument("--flow", help="teacher: the flow training run (folder with config.json and checkpoints/)")
    p.add_argument("--vae", help="teacher: the vae training run the flow run's latents came from")
    p.add_argument("--text", help="teacher: the frozen text stack's weights (.npz; the demo's text/params.npz)")
    p.add_argument("--text-distill", dest="text_distill", help="Neodragon: the text-distill run (DistilT5 + "
                                                               "ContextAdapter)")
    p.add_argument("--decoder", help="Neodragon: the decoder run (the light decoder)")
    p.add_argument("--dmd", help="Neodragon: the dmd run (its generator: the pruned 1-1-1 MMDiT)")
    p.add_argument("--teacher-schedule", dest="teacher_schedules", action="append", default=[],
                   help="Neodragon: the teacher's schedules to record the kept share and NFE ratio against "
                        "(repeatable; 'teacher' = its release record's default schedule, the default; e.g. "
                        "20-20-20 is measured with the teacher's guidance on the same prompts)")
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


#: How a distilled Neodragon samples unless its release says otherwise: one Euler step per stage, no guidance.
NEODRAGON_SAMPLING = ("sampling.first_unit_steps=[1,1,1]", "sampling.later_unit_steps=[1,1,1]",
                      "sampling.first_unit_cfg=0.0", "sampling.later_unit_cfg=0.0")


def _teacher_name(spec: str) -> str:
    return spec[len("release:"):] if spec.startswith("release:") else spec


def build_neodragon_pipeline(text_distill: Path, decoder: Path, dmd: Path, *, ema: bool, overrides):
    """The Neodragon pipeline the technique runs make (float32), its config, the dmd step, and the teacher's spec.

    The three runs must share one teacher: the DistilT5 + ContextAdapter learned that teacher's text tokens,
    the light decoder its VAE's latents, and the generator was distilled from its MMDiT."""
    import dataclasses

    from flax import nnx

    from neodragon_cli.dmd import DMDError, load_generator
    from neodragon_cli.eval_decoder import EvalError, _decoder_from_run, _load_run
    from neodragon_cli.text_distill import student_pipeline
    from neodragon_jax.config.loader import apply_overrides
    from neodragon_jax.models.vae import CausalVideoVAE
    from train.decoder import DecoderStage
    from train.text_distill import load_run
    from train.weights import run_state

    for what, path in (("--text-distill", text_distill), ("--decoder", decoder), ("--dmd", dmd)):
        if not (path / "config.json").is_file():
            raise ReleaseUsageError(f"{what} {path}: not a training run (no config.json)")
    try:
        _, gen, dmd_cfg = load_generator(str(dmd), use_ema=ema)
        dec_cfg = _load_run(decoder)
    except (DMDError, EvalError) as e:
        raise ReleaseUsageError(str(e)) from None
    trun = load_run(text_distill, use_ema=ema)
    teachers = {"--dmd": dmd_cfg.stages.get_settings("dmd").teacher,
                "--decoder": dec_cfg.stages.get_settings("decoder").vae,
                "--text-distill": trun.stage.settings.embedder_init or trun.stage.settings.teacher_init}
    if len({_teacher_name(t) for t in teachers.values()}) != 1:
        raise ReleaseUsageError("the runs were distilled from different teachers (" + ", ".join(
            f"{k}: {v}" for k, v in teachers.items()) + "); a Neodragon's parts must share one teacher")
    if dec_cfg.model.vae.causal != gen.cfg.model.vae.causal:
        raise ReleaseUsageError(f"--decoder {decoder}: its VAE config differs from the teacher's")
    if dec_cfg.stages.get_settings("decoder").family != "light":
        raise ReleaseUsageError(f"--decoder {decoder}: a {dec_cfg.stages.get_settings('decoder').family!r} decoder "
                                f"run; a Neodragon ships the light decoder")
    pipe = student_pipeline(gen, trun)
    try:
        dec, dec_weights = _decoder_from_run(DecoderStage(dec_cfg), dec_cfg, decoder, None, "auto" if ema else "raw")
    except EvalError as e:
        raise ReleaseUsageError(f"--decoder {decoder}: {e}") from None
    vae_cfg = dataclasses.replace(pipe.cfg.model.vae, decoder="light", light_decoder=dec_cfg.model.vae.light_decoder)
    vae = nnx.eval_shape(lambda: CausalVideoVAE(vae_cfg, decoder="light", rngs=nnx.Rngs(0)))
    vae.encoder, vae.quant_conv = pipe.vae.encoder, pipe.vae.quant_conv
    vae.post_quant_conv, vae.decoder = dec.post_quant_conv, dec.decoder
    cfg = dataclasses.replace(pipe.cfg, model=dataclasses.replace(pipe.cfg.model, vae=vae_cfg))
    cfg = apply_overrides(cfg, list(NEODRAGON_SAMPLING) + list(overrides))
    step, _ = run_state(dmd, None)
    pipe = pipe.replace(cfg=cfg, vae=vae, source=(
        f"dmd run {dmd} ({'EMA' if ema else 'raw'} generator, step {step}), text-distill run {text_distill} "
        f"({trun.weights}, step {trun.step}), decoder run {decoder} ({dec_weights}), teacher {teachers['--dmd']}"))
    runs = {"dmd_run": str(dmd), "dmd_step": step, "text_distill_run": str(text_distill),
            "text_distill_step": trun.step, "decoder_run": str(decoder), "decoder_weights": dec_weights,
            "teacher": teachers["--dmd"], "dmd_training": _clips_seen(dmd, dmd_cfg),
            "text_distill_training": _clips_seen(text_distill, trun.cfg),
            "decoder_training": _clips_seen(decoder, dec_cfg)}
    return pipe, cfg, step, runs


#: The accuracies a distilled release is judged by against its teacher (the issue's "strict-scorer accuracy").
KEPT_ATTRIBUTES = ("colour", "motion")


def against_teacher(scores: dict, teacher_rows: dict, teacher_spec: str) -> dict:
    """``{schedule: {teacher schedule: row}}``: for every scored schedule against every teacher row, the NFE
    ratio and the kept share of each :data:`KEPT_ATTRIBUTES` accuracy and of their mean."""
    out = {}
    for label, row in scores.items():
        out[label] = {}
        for tlabel, ref in teacher_rows.items():
            kept = {a: row["accuracy"][a] / ref["accuracy"][a] for a in KEPT_ATTRIBUTES
                    if ref["accuracy"].get(a) and a in row["accuracy"]}
            mean_t = sum(ref["accuracy"][a] for a in kept) / max(len(kept), 1)
            mean_s = sum(row["accuracy"][a] for a in kept) / max(len(kept), 1)
            out[label][tlabel] = {"teacher": teacher_spec, "teacher_schedule": ref["schedule"],
                                  "teacher_nfe": ref["nfe"], "nfe": row["nfe"],
                                  "nfe_ratio": ref["nfe"] / max(row["nfe"], 1),
                                  "kept": {**kept, "mean": mean_s / mean_t if mean_t else 0.0}}
    return out


def teacher_rows(teacher_spec: str, schedules: list[str], prompts: list[str], progress=None) -> dict:
    """The teacher release's held-out scores per ``schedules`` entry: ``teacher`` is its record's (measured when
    it was released, on the same prompts and seeds); any other is measured now with the teacher's guidance."""
    from neodragon_jax.eval.heldout import evaluate_heldout
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline
    from neodragon_jax.releases import ReleaseError, get_release

    if not teacher_spec.startswith("release:"):
        raise ReleaseUsageError(f"the runs' teacher {teacher_spec!r} is not a release: nothing to compare against")
    try:
        rel = get_release(_teacher_name(teacher_spec))
    except ReleaseError as e:
        raise ReleaseUsageError(f"the runs' teacher {teacher_spec!r}: {e}") from None
    rows, pipe = {}, None
    for label, first, later, scales in parse_schedules(",".join(schedules), rel.config()):
        recorded = rel.record.get("scores", {}).get(label)
        if recorded and recorded.get("videos") == len(prompts):
            rows[label] = recorded
            continue
        if pipe is None:
            rel.verify()
            pipe = TextToVideoPipeline.from_official(rel.folder, rel.config(), transformer=rel.transformer)
        res = evaluate_heldout(pipe, prompts, first_unit_steps=first, later_unit_steps=later, cfg_scales=scales,
                               progress=progress)
        rows[label] = {k: v for k, v in res.as_dict().items() if k != "per_video"}
    return rows


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
    teacher_args = {"--flow": args.flow, "--vae": args.vae, "--text": args.text}
    neo_args = {"--text-distill": args.text_distill, "--decoder": args.decoder, "--dmd": args.dmd}
    neodragon = any(neo_args.values())
    given, needed = (neo_args, teacher_args) if neodragon else (teacher_args, neo_args)
    if neodragon and any(teacher_args.values()):
        raise ReleaseUsageError("give either --flow/--vae/--text (a teacher) or --text-distill/--decoder/--dmd "
                                "(a Neodragon), not both")
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ReleaseUsageError(f"missing {', '.join(missing)} (a {'Neodragon' if neodragon else 'teacher'} release "
                                f"needs {', '.join(given)})")
    if neodragon and args.step is not None:
        raise ReleaseUsageError("--step picks a flow checkpoint; a Neodragon release takes each run's latest")
    runs = {}
    try:
        if neodragon:
            pipe32, cfg, step, runs = build_neodragon_pipeline(
                Path(args.text_distill), Path(args.decoder), Path(args.dmd), ema=not args.raw, overrides=args.overrides)
        else:
            flow, vae, text = Path(args.flow), Path(args.vae), Path(args.text)
            pipe32, cfg, step = build_pipeline(flow, vae, text, step=args.step, ema=not args.raw,
                                               overrides=args.overrides)
    except WeightSourceError as e:
        raise ReleaseUsageError(str(e)) from None
    schedules = parse_schedules(args.schedules, cfg)
    transformer = "diffusion_transformer_320p"
    staging = out.with_name(f".{out.name}.release-staging")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[release] writing {args.name} ({args.dtype} storage) from {pipe32.source}", flush=True)
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

    made_by = {
        "command": "neodragon release " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["release"] else sys.argv[1:]),
        "commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}",
        "training_command": args.training_command,
    }
    if neodragon:
        made_by.update(runs, weights="raw" if args.raw else "ema")
    else:
        vae_cfg = _read_json(vae / "config.json")
        vae_cfg.pop("stages", None)  # a run of an older layout may record stage settings the schema reads differently
        made_by.update({"flow_run": str(flow), "flow_step": step, "flow_weights": "raw" if args.raw else "ema",
                        "vae_run": str(vae), "text_weights": str(text), "flow_training": _clips_seen(flow, cfg),
                        "vae_training": _clips_seen(vae, from_dict(vae_cfg))})
    made_by["release_seconds"] = time.perf_counter() - t_start
    record.update({"made_by": made_by, "dtype_check": dtype_check, "scores": scores, "reference": reference})
    if neodragon:
        def teacher_progress(i, n):
            if i == n or i % 16 == 0:
                print(f"[release] teacher: {i}/{n} videos", flush=True)

        t_rows = teacher_rows(runs["teacher"], args.teacher_schedules or ["teacher"], prompts,
                              progress=teacher_progress)
        record["teacher_scores"] = t_rows
        record["against_teacher"] = against_teacher(scores, t_rows, runs["teacher"])
        for label, rows in record["against_teacher"].items():
            for tlabel, row in rows.items():
                print(f"[release] {args.name} ({label} schedule) against the teacher at {row['teacher_schedule']}: "
                      f"{row['nfe_ratio']:.1f}x fewer NFE; kept " +
                      ", ".join(f"{a} {k:.1%}" for a, k in row["kept"].items()), flush=True)
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
