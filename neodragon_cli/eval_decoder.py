"""`neodragon eval decoder --run DIR`: a `decoder` run's trained decoder against the source VAE's native one.

On held-out synthetic-domain videos (rendered from held-out (colour, shape, motion) triples, or a video
folder with ``--data``), both decoders decode the frozen encoder's posterior means:

* PSNR and SSIM (dm-pix, [0, 1] frames; LPIPS too when the run trained with it) per frame position (frame 0
  decodes from a single latent frame), and over the whole clip;
* the light decoder streamed one latent frame at a time (``LightDecoder.step``, what a phone runs) against
  its whole-clip decode (max abs difference);
* decode time per video on this machine (batch 1, jitted, best of ``--repeats``, the two interleaved);
* parameter counts (``post_quant_conv`` + decoder) and their ratio;
* the strict scorer (``neodragon_jax.eval.scorer``) on the teacher's generated videos (``--teacher``, default
  the shipped ``tiny-teacher`` release) decoded by each, beside the chance level.

Writes ``<run>/eval/report.md`` (tables, contact sheets original / native / light), ``report.json`` and the
sheets; prints the tables.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


class EvalError(Exception):
    """A user error: one line, exit status 2."""


def add_arguments(p) -> None:
    p.add_argument("what", choices=["decoder"], help="what to evaluate: decoder (a `neodragon train decoder` run)")
    p.add_argument("--run", required=True, help="the run folder (config.json, checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                   help="the run's EMA weights when it kept them (auto), or the raw ones")
    p.add_argument("--videos", type=int, default=48, help="held-out videos to reconstruct (default 48)")
    p.add_argument("--data", default=None, help="a video folder to reconstruct instead of rendered held-out videos")
    p.add_argument("--seed", type=int, default=1, help="seed of the rendered held-out videos (default 1)")
    p.add_argument("--prompts", type=int, default=48,
                   help="held-out prompts the teacher generates for the scorer (default 48; 0 = skip)")
    p.add_argument("--teacher", default="release:tiny-teacher",
                   help="the text-to-video teacher whose latents both decoders decode: release:NAME, an official "
                        "folder, or none (default release:tiny-teacher)")
    p.add_argument("--repeats", type=int, default=10, help="timed decodes per decoder (best is reported)")
    p.add_argument("--out", default=None, help="report folder (default RUN/eval)")


def run(args) -> int:
    try:
        return _run(args)
    except EvalError as e:
        print(f"neodragon eval: {e}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------ pieces
def _load_run(run_dir: Path):
    from neodragon_jax.config import from_json

    path = run_dir / "config.json"
    if not path.is_file():
        raise EvalError(f"--run {str(run_dir)!r} is not a training run folder (no config.json)")
    cfg = from_json(path.read_text())
    if cfg.train.stage != "decoder":
        raise EvalError(f"--run {str(run_dir)!r} trained stage {cfg.train.stage!r}, not decoder")
    return cfg


def _held_out_videos(cfg, n: int, seed: int, data: str | None):
    """uint8 ``[N, F, H, W, 3]`` clips and their captions."""
    v = cfg.video
    if data:
        from neodragon_jax.data.video_folder import VideoFolder

        try:
            folder = VideoFolder.from_config(data, cfg)
        except (ValueError, FileNotFoundError) as e:  # DatasetError, DatasetNotFoundError
            raise EvalError(f"--data {data!r}: {e}") from None
        clips, texts = [], []
        for i in range(len(folder)):
            item = folder.get(i)
            if item is None:
                continue
            clips.append(np.clip(np.rint((np.transpose(item["video"], (1, 2, 3, 0)) + 1) * 127.5), 0, 255)
                         .astype(np.uint8))
            texts.append(item["text"])
            if len(clips) == n:
                break
        if not clips:
            raise EvalError(f"--data {data!r} has no readable video")
        return np.stack(clips), texts
    from neodragon_jax.data.captions import split_combinations
    from neodragon_jax.data.synthetic import dataset_item, render_scene

    split = split_combinations()
    clips, texts = [], []
    for i in range(n):
        scene, text, rseed = dataset_item(i, seed=seed, combinations=split.held_out, num_objects=1)
        clips.append(render_scene(scene, height=v.height, width=v.width, num_frames=v.num_frames, seed=rseed))
        texts.append(text)
    return np.stack(clips), texts


def _num_params(module) -> int:
    import jax
    from flax import nnx

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _decoder_from_run(stage, cfg, run_dir: Path, step, weights: str):
    from flax import nnx

    from neodragon_jax.models.build import init_jit
    from train.weights import WeightSourceError, assign, load_weights

    dec = init_jit(lambda: stage.build_decoder(cfg, nnx.Rngs(0)))
    at = f"@{step}" if step is not None else ""
    tries = {"auto": (":ema", ":raw"), "ema": (":ema",), "raw": (":raw",)}[weights]
    last = None
    for suffix in tries:
        try:
            assign(dec, load_weights(f"run:{run_dir}{at}{suffix}#decoder", dec))
            return dec, suffix[1:]
        except WeightSourceError as e:
            last = e
    raise EvalError(str(last))


def _per_frame_metrics(rec: np.ndarray, ref: np.ndarray, lpips=None) -> dict[str, np.ndarray]:
    """``rec``, ``ref``: float ``[N, 3, F, H, W]`` in [-1, 1] -> per video and frame ``[N, F]`` arrays."""
    import jax.numpy as jnp

    from train.decoder import frames01, ssim_frames

    n, _, f = rec.shape[:3]
    err = np.mean(np.square(rec.astype(np.float64) - ref), axis=(1, 3, 4))  # [N, F]
    out = {"psnr": np.minimum(10 * np.log10(4.0 / np.maximum(err, 1e-30)), 100.0),
           "ssim": np.asarray(ssim_frames(frames01(jnp.asarray(rec)), frames01(jnp.asarray(ref)))).reshape(n, f)}
    if lpips is not None:
        a, b = frames01(jnp.asarray(rec)) * 2 - 1, frames01(jnp.asarray(ref)) * 2 - 1
        out["lpips"] = np.asarray(lpips(a, b)).reshape(n, f)
    return out


def _teacher(spec: str, cfg):
    """(pipeline, label) of ``--teacher``, or (None, why) for ``none``. ``cfg``: the run's config, the base of
    an official folder's config (its model fields come from the folder's ``config.json`` files). Checked before
    any decoding, so a missing teacher costs nothing: one line naming what to pass instead."""
    from neodragon_jax.pipelines.official import config_from_official_folder
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    if spec in ("", "none"):
        return None, "skipped (--teacher none)"
    hint = "pass --teacher official:DIR (a text-to-video folder), or --teacher none to skip the scorer"
    if spec.startswith("release:"):
        from neodragon_jax.releases import ReleaseError, get_release

        try:
            rel = get_release(spec[len("release:"):])
            rel.verify()
            return TextToVideoPipeline.from_official(rel.folder, rel.config(), transformer=rel.transformer), spec
        except ReleaseError as e:
            raise EvalError(f"--teacher {spec!r}: {e}; {hint}") from None
    folder = Path(spec[len("official:"):] if spec.startswith("official:") else spec)
    if not folder.is_dir():
        raise EvalError(f"--teacher {spec!r}: no such folder; {hint}")
    try:
        return TextToVideoPipeline.from_official(folder, config_from_official_folder(folder, cfg)), str(folder)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvalError(f"--teacher {spec!r}: {e}") from None


# ------------------------------------------------------------------------------------------------- main
def _run(args) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from neodragon_jax.data.video_io import to_uint8_frames
    from neodragon_jax.models.build import init_jit
    from neodragon_jax.models.vae import VAEDecoderPart, VAEEncoderPart
    from neodragon_jax.models.vae.normalize import denormalize_latents
    from train.decoder import DecoderStage
    from train.vae import to_model_video
    from train.weights import WeightSourceError, assign, load_weights

    run_dir = Path(args.run).absolute()
    cfg = _load_run(run_dir)
    if args.videos < 1 or args.repeats < 1 or args.prompts < 0 or args.prompts == 1:
        raise EvalError("--videos and --repeats must be >= 1, --prompts 0 (skip the scorer) or >= 2 (its chance "
                        "level deranges the captions)")
    try:
        stage = DecoderStage(cfg, progress=False)
    except ValueError as e:
        raise EvalError(str(e)) from None
    s = stage.settings
    out = Path(args.out or run_dir / "eval").absolute()
    print(f"neodragon eval decoder: run {run_dir} ({s.family} decoder), VAE source {s.vae}", flush=True)

    if stage.encoder_init == "random":
        # Frozen roles are not checkpointed: the run's random encoder is gone, and another one would hand
        # the trained decoder latents it never saw.
        raise EvalError(f"--run {str(run_dir)!r} trained against a random VAE (stages.decoder.vae='random', a "
                        f"smoke run): no encoder or native decoder to measure against; train from release:NAME "
                        f"or official:DIR")
    encoder = init_jit(lambda: VAEEncoderPart(cfg.model.vae, rngs=nnx.Rngs(0)))
    native = init_jit(lambda: VAEDecoderPart(cfg.model.vae, decoder="native", rngs=nnx.Rngs(0)))
    try:
        assign(encoder, load_weights(stage.encoder_init, encoder))
        assign(native, load_weights(stage.encoder_init, native))
    except WeightSourceError as e:
        raise EvalError(f"the run's VAE source {s.vae!r} (encoder and native decoder): {e}") from None
    trained, which = _decoder_from_run(stage, cfg, run_dir, args.step, args.weights)
    pipe, teacher_note = _teacher(args.teacher, cfg) if args.prompts else (None, "skipped (--prompts 0)")
    label = "light" if s.family == "light" else "trained native"
    decoders = {"native": native, label: trained}
    lpips = None
    if s.lpips:
        lpips = init_jit(lambda: stage.build_lpips(cfg, nnx.Rngs(0)))
        assign(lpips, load_weights(f"npz:{s.lpips}", lpips))

    def jitted(module, fn):
        graphdef, state = nnx.split(module)
        f = jax.jit(lambda st, x: fn(nnx.merge(graphdef, st), x))
        return lambda x: f(state, x)

    encode = jitted(encoder, lambda m, x: m.encode(x).mean)
    decode = {k: jitted(m, lambda m, z: jnp.clip(m.decode(z).astype(jnp.float32), -1.0, 1.0))
              for k, m in decoders.items()}

    # -- reconstruction of held-out videos -------------------------------------------------------------
    clips, texts = _held_out_videos(cfg, args.videos, args.seed, args.data)
    videos = np.stack([to_model_video(c) for c in clips])
    lat, recs = [], {k: [] for k in decoders}
    for i in range(0, len(videos), 8):
        z = encode(jnp.asarray(videos[i:i + 8]))
        lat.append(np.asarray(z))
        for k in decoders:
            recs[k].append(np.asarray(decode[k](z)))
    latents = np.concatenate(lat)
    recs = {k: np.concatenate(v) for k, v in recs.items()}
    metrics = {k: _per_frame_metrics(r, videos, lpips) for k, r in recs.items()}

    rows, f = [], videos.shape[2]
    names = list(decoders)
    keys = [m for m in ("psnr", "ssim", "lpips") if m in metrics[names[0]]]
    for t in list(range(f)) + ["all"]:
        row = [str(t) if t != "all" else "whole clip"]
        for k in names:
            for m in keys:
                vals = metrics[k][m] if t == "all" else metrics[k][m][:, t]
                row.append(f"{float(np.mean(vals)):.4f}" if m != "psnr" else f"{float(np.mean(vals)):.2f}")
        rows.append(row)
    header = ["frame"] + [f"{k} {m.upper() if m == 'psnr' else m}" for k in names for m in keys]

    # -- streaming, timing, sizes ------------------------------------------------------------------------
    stream = None
    if s.family == "light":
        z = jnp.asarray(latents[:4])
        whole = trained.decode(z)
        stream = float(jnp.max(jnp.abs(trained.decode_stream(z) - whole)))
    one = jnp.asarray(latents[:1])
    for k in names:
        jax.block_until_ready(decode[k](one))  # compile
    times = {k: float("inf") for k in names}
    for _ in range(args.repeats):  # interleaved: both see the same load on a shared machine
        for k in names:
            t = time.perf_counter()
            jax.block_until_ready(decode[k](one))
            times[k] = min(times[k], time.perf_counter() - t)
    params = {k: _num_params(m) for k, m in decoders.items()}

    # -- the teacher's generated videos through both decoders ------------------------------------------------
    scored = None
    gen_sheet = None
    if pipe is not None:
        from neodragon_jax.eval.report import labelled_sheet
        from neodragon_jax.eval.scorer import chance_level, score_pairs
        from neodragon_jax.pipelines.text_to_video import GenerationRequest

        if pipe.cfg.model.vae.causal != cfg.model.vae.causal:
            diff = [f.name for f in dataclasses.fields(cfg.model.vae.causal)
                    if getattr(cfg.model.vae.causal, f.name) != getattr(pipe.cfg.model.vae.causal, f.name)]
            print(f"  warning: the teacher's VAE config differs from the run's in {', '.join(diff)}", flush=True)
        _, p_texts = _held_out_videos(cfg, args.prompts, args.seed + 1000, None)
        gen = {k: [] for k in names}
        t0 = time.perf_counter()
        for i, text in enumerate(p_texts):
            g = pipe.generate(GenerationRequest(text, seed=i))
            # Both decoders decode what the pipeline hands its decoder (spec §5.1 denormalisation with the
            # teacher's constants), not the teacher's own decoder output: the baseline is the run's native one.
            raw = denormalize_latents(jnp.asarray(g.latents[None]), pipe.cfg.model.vae)
            for k in names:
                gen[k].append(to_uint8_frames(np.asarray(decode[k](raw))[0]))
            if (i + 1) % 8 == 0 or i + 1 == len(p_texts):
                print(f"  generated {i + 1}/{len(p_texts)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        scored = {}
        for k in names:
            rep = score_pairs(zip(gen[k], p_texts))
            chance = chance_level([v.analysis for v in rep.videos], p_texts)
            scored[k] = {"accuracy": rep.accuracy, "all_correct": rep.all_correct, "chance": chance}
        n_show = min(6, len(p_texts))
        gen_sheet = labelled_sheet([gen[k][i] for i in range(n_show) for k in names],
                                   [f"{k}: {p_texts[i][:48]}" for i in range(n_show) for k in names])

    # -- report -----------------------------------------------------------------------------------------------
    from neodragon_jax.eval.report import MarkdownReport, labelled_sheet, markdown_table

    n_show = min(6, len(clips))
    rows_v, rows_l = [], []
    for i in range(n_show):
        rows_v += [clips[i]] + [to_uint8_frames(recs[k][i]) for k in names]
        rows_l += [f"original: {texts[i][:48]}"] + [k for k in names]
    sheet = labelled_sheet(rows_v, rows_l)
    ratio = params["native"] / params[label]
    speed = times["native"] / times[label]
    summary = {
        "run": str(run_dir), "weights": which, "vae_source": s.vae, "family": s.family,
        "videos": len(clips), "params": params, "param_ratio": ratio,
        "decode_seconds_per_video": times, "speedup": speed, "stream_max_abs_diff": stream,
        "per_frame": {k: {m: np.mean(v, axis=0).tolist() for m, v in metrics[k].items()} for k in names},
        "whole_clip": {k: {m: float(np.mean(v)) for m, v in metrics[k].items()} for k in names},
        "teacher": teacher_note, "scores": scored,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    rep = MarkdownReport(out / "report.md", f"Decoder distillation: {label} vs native decoder")
    rep.paragraph(f"Run `{run_dir}` ({which} weights), VAE source `{s.vae}`; {len(clips)} held-out videos "
                  f"({cfg.video.num_frames} frames, {cfg.video.height}x{cfg.video.width}), posterior means decoded.")
    rep.table(["", "native", label], [
        ["parameters (post_quant_conv + decoder)", f"{params['native']:,}", f"{params[label]:,}"],
        ["ratio native / " + label, "", f"{ratio:.1f}x"],
        ["decode time per video (s, this machine, best of %d)" % args.repeats,
         f"{times['native']:.4f}", f"{times[label]:.4f}"],
        ["speed-up", "", f"{speed:.1f}x"],
    ] + ([["streaming vs whole clip (max abs diff)", "", f"{stream:.2e}"]] if stream is not None else []))
    rep.heading("Reconstruction per frame position")
    rep.table(header, rows)
    rep.image(sheet, "reconstructions.png", "original / native / light")
    if scored:
        rep.heading(f"Strict scorer on the teacher's generated videos ({teacher_note}, {args.prompts} held-out prompts)")
        attrs = list(scored["native"]["accuracy"])
        rep.table(["attribute"] + [f"{k}" for k in names] + [f"{k} chance" for k in names],
                  [[a] + [f"{scored[k]['accuracy'][a]:.3f}" for k in names]
                   + [f"{scored[k]['chance'].get(a, float('nan')):.3f}" for k in names] for a in attrs]
                  + [["all correct"] + [f"{scored[k]['all_correct']:.3f}" for k in names] + ["", ""]])
        rep.image(gen_sheet, "generated.png", "generated: native / light")
    else:
        rep.paragraph(f"Teacher's generated videos: {teacher_note or 'skipped (--prompts 0)'}.")
    rep.write()
    print(markdown_table(["", "native", label], [
        ["params", params["native"], params[label]], ["ratio", "", f"{ratio:.1f}x"],
        ["decode s/video", f"{times['native']:.4f}", f"{times[label]:.4f}"], ["speed-up", "", f"{speed:.1f}x"]]))
    print(markdown_table(header, rows))
    if stream is not None:
        print(f"streaming vs whole clip: max abs diff {stream:.2e}")
    if scored:
        attrs = list(scored["native"]["accuracy"])
        print(markdown_table(["attribute"] + names + [f"{k} chance" for k in names],
                             [[a] + [f"{scored[k]['accuracy'][a]:.3f}" for k in names]
                              + [f"{scored[k]['chance'].get(a, float('nan')):.3f}" for k in names] for a in attrs]))
    else:
        print(f"teacher's generated videos: {teacher_note or 'skipped'}")
    print(f"report: {out / 'report.md'}")
    return 0


__all__ = ["add_arguments", "run"]
