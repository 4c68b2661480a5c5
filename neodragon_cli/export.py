"""`neodragon export tflite|onnx|qnn|all`: static on-device graphs, numerically checked at every hop.

    neodragon export all --config tiny --out outputs/export --precision fp32,fp16,int8
    neodragon export qnn --config tiny --device "Snapdragon 8 Elite QRD" --dry-run

Builds the components of ``export.components`` (weights from ``--checkpoint`` or random non-zero weights),
converts them, runs every artifact against the PyTorch mirror and writes ``<out>/report.md`` (one table for
the whole model) and ``<out>/report.json``. Exit status: 0 when every artifact met its tolerance (or, for a
dry run, every AI Hub request was prepared), 1 when any failed, 2 on a usage / configuration error.

Needs the export extra: ``pip install -e ".[torch,export]"``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TARGETS = ("tflite", "onnx", "qnn", "all")


def add_arguments(p) -> None:
    p.add_argument("target", choices=TARGETS, help="tflite | onnx | qnn (Qualcomm AI Hub) | all")
    p.add_argument("--config", default="tiny", help="preset name or .toml path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable")
    p.add_argument("--checkpoint", default=None,
                   help="official-layout model folder (default: random non-zero weights, for checking the export)")
    p.add_argument("--model", default=None,
                   help="a release to export: a shipped release's name (neodragon generate --list) or a release folder "
                        "(one with release.json, e.g. the recipe's release/neodragon-tiny); its config and weights")
    p.add_argument("--stack", choices=("neodragon", "preset"), default=None,
                   help="'neodragon': export the preset's Neodragon deployment stack (DistilT5 + ContextAdapter, "
                        "light decoder) - the default without --checkpoint; 'preset': the preset as it is "
                        "(default with --checkpoint)")
    p.add_argument("--out", default="outputs/export", help="output folder (default: outputs/export)")
    p.add_argument("--precision", default="fp32,fp16,int8",
                   help="TFLite weight precisions, comma separated: fp32, fp16, int8 (weight-only), int8dyn "
                        "(dynamic range) (default: fp32,fp16,int8)")
    p.add_argument("--qnn-precision", default="fp16",
                   help="AI Hub compile precisions: fp32, fp16 (--quantize_full_type float16), int8 (w8a16, "
                        "calibrated on the example inputs) (default: fp16)")
    p.add_argument("--device", default=None, help='AI Hub device (default: "Snapdragon 8 Elite QRD")')
    p.add_argument("--dry-run", action="store_true",
                   help="qnn: write the artifacts and the exact AI Hub job requests (requests.json), no network")
    p.add_argument("--mmdit-split", type=int, default=1,
                   help="graphs per MMDiT stage (block ranges), for per-graph size limits (default: 1)")
    p.add_argument("--components", default=None,
                   help="comma-separated component or group names to export (default: all), e.g. "
                        "context_adapter,mmdit_stage2")
    p.add_argument("--frames", type=int, default=None, help="video frames the graphs are sized for (default: config)")
    p.add_argument("--latency-runs", type=int, default=5, help="timed runs per latency figure; 0 = no latency")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of LiteRT, ONNX Runtime and PyTorch for the latency columns (default 1: "
                        "comparable, and immune to OpenMP spin-waiting on a busy machine; JAX keeps its default)")
    p.add_argument("--seed", type=int, default=0, help="random weights and example inputs")
    p.add_argument("--score-prompts", type=int, default=0,
                   help="after the TFLite export, generate this many held-out prompts with the LiteRT text encoders "
                        "and decoder in place of the JAX ones (each precision) and with the JAX pipeline, and "
                        "score both (needs --model or --checkpoint; default 0: no scoring)")


def _fail(msg: str) -> int:
    print(f"neodragon export: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        from export import components as ec
        from export import qnn, report, tflite
    except ImportError as err:
        return _fail(f"needs the export extra ({err}); install it with: pip install -e \".[torch,export]\"")

    targets = ("tflite", "onnx", "qnn") if args.target == "all" else (args.target,)
    try:
        precisions = tflite.check_precisions(p.strip() for p in args.precision.split(",") if p.strip())
        qnn_precisions = [p.strip() for p in args.qnn_precision.split(",") if p.strip()]
        for p in qnn_precisions:
            qnn.compile_options(p)
    except ValueError as err:
        return _fail(str(err))
    device = args.device or qnn.DEFAULT_DEVICE
    if args.score_prompts and ("tflite" not in targets or not (args.model or args.checkpoint)):
        return _fail("--score-prompts scores the TFLite graphs of trained weights: use it with the tflite (or all) "
                     "target and --model or --checkpoint")
    if args.score_prompts < 0 or args.score_prompts == 1:
        return _fail(f"--score-prompts must be 0 or at least 2 (chance needs shuffled captions), got "
                     f"{args.score_prompts}")
    if args.device and "qnn" not in targets:
        return _fail("--device is for the qnn target (AI Hub); use `neodragon export qnn` or `all`")
    hub_config = None
    if "qnn" in targets and not args.dry_run:
        try:  # up front: an unconfigured or offline AI Hub must not cost a whole export first
            hub_config = qnn.check_configuration()
            qnn.check_reachable(hub_config.api_url)
        except qnn.HubConfigError as err:
            return _fail(str(err))

    from neodragon_jax.config import load_config
    from neodragon_jax.convert.io import CheckpointNotFoundError, CheckpointReadError
    from neodragon_jax.convert.keymap import CheckpointMismatchError

    if args.model:
        from neodragon_jax.releases import ReleaseError, get_release

        if args.checkpoint:
            return _fail("give --model or --checkpoint, not both")
        folder = Path(args.model)
        try:
            rel = get_release(folder.name, root=folder.parent) if (folder / "release.json").is_file() \
                else get_release(args.model)
            rel.verify()
        except ReleaseError as e:
            return _fail(f"--model {args.model!r}: {e}")
        cfg = rel.config(args.overrides)
        args.checkpoint = str(rel.folder)
        transformer = rel.transformer
        stack = args.stack or "preset"
    else:
        cfg = load_config(args.config, args.overrides)
        stack = args.stack or ("preset" if args.checkpoint else "neodragon")
        transformer = None
    try:
        if stack == "neodragon":
            cfg = ec.neodragon_variant(cfg)
        opts = ec.ExportOptions(
            mmdit_split=args.mmdit_split, num_frames=args.frames, seed=args.seed,
            components=tuple(c.strip() for c in args.components.split(",")) if args.components else None,
        )
        known = set(ec.component_names(cfg, opts))
        known |= {n.split("_part")[0] for n in known}
        unknown = sorted(set(opts.components or ()) - known)
        if unknown:
            return _fail(f"unknown component(s) {unknown}; this config has {sorted(known)}")
        t0 = time.perf_counter()
        cfg, models = ec.load_jax_models(cfg, args.checkpoint, seed=args.seed)
        comps = ec.build_components(cfg, models, opts)
    except ec.ExportError as err:
        return _fail(str(err))
    except (CheckpointNotFoundError, CheckpointReadError) as err:  # a missing, incomplete or damaged --checkpoint
        return _fail(str(err))
    except CheckpointMismatchError as err:
        return _fail(f"--checkpoint {args.checkpoint!r} does not fit config {cfg.name!r}: {err}")
    if not args.checkpoint:
        print("neodragon export: no --checkpoint - random non-zero weights (the numerical checks are real, the "
              "model is not)", file=sys.stderr)
    print(f"built {len(comps)} components in {time.perf_counter() - t0:.1f} s: {', '.join(c.name for c in comps)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for c in comps:
        c.expected()
        row = {"name": c.name, "group": c.group, "params": c.params, "description": c.description,
               "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in c.inputs.items()}}
        if args.latency_runs:
            import torch

            with torch.no_grad():
                inputs = c.torch_inputs()
                row["torch_ms"] = report.measure_latency(lambda: c.module(*inputs), args.latency_runs)
            if c.jax_fn is not None:
                vals = list(c.inputs.values())
                row["jax_ms"] = report.measure_latency(lambda: c.jax_fn(*vals), args.latency_runs)
        rows.append(row)

    results = []
    if "tflite" in targets:
        results += tflite.export_tflite(comps, out / "tflite", precisions, latency_runs=args.latency_runs,
                                        num_threads=args.threads, log=log)
    onnx_results = []
    if "onnx" in targets or "qnn" in targets:
        from export import onnx as eonnx

        onnx_results = eonnx.export_onnx(comps, out / "onnx", latency_runs=args.latency_runs,
                                         num_threads=args.threads, log=log)
        results += onnx_results
    hub_results = []
    if "qnn" in targets:
        requests, skipped = qnn.prepare_requests(comps, onnx_results, out / "qnn", device=device,
                                                 precisions=qnn_precisions)
        req_path = qnn.write_requests(requests, out / "qnn" / "requests.json", device=device)
        hub_results += skipped
        if args.dry_run:
            print(f"dry run: wrote {len(requests)} AI Hub job requests to {req_path} (nothing submitted)")
            hub_results += [report.ArtifactResult(
                component=r.component, group=r.group, backend="qnn", precision=r.precision, status="prepared",
                path=r.model, params=r.params, message=f"dry run: request in {req_path}") for r in requests]
        else:
            hub_results += qnn.submit(requests, out / "qnn", {c.name: c for c in comps}, config=hub_config, log=log)
        results += hub_results

    notes = [
        f"config `{cfg.name}` ({stack} stack), weights: {args.checkpoint or 'random non-zero (seed %d)' % args.seed}",
        f"batch 1, {cfg.video.num_frames if args.frames is None else args.frames} frames "
        f"{cfg.video.height}x{cfg.video.width}, MMDiT graphs sized for the last unit, "
        f"{args.mmdit_split} graph(s) per stage; latencies with {args.threads or 'default'} CPU thread(s) for "
        f"LiteRT / ONNX Runtime / PyTorch",
    ]
    if "qnn" in targets:
        prepared = sum(r.status == "prepared" for r in hub_results)
        notes.append(f"Qualcomm AI Hub ({device}): " + (
            f"dry run, {prepared} job request(s) in `{out / 'qnn' / 'requests.json'}`, nothing submitted"
            if args.dry_run else f"{sum(r.ok for r in hub_results)}/{len(hub_results)} artifacts within tolerance "
                                 f"on the device (table below)"))
    text = report.markdown_report(results, rows, title=f"neodragon export: {cfg.name}", precisions=precisions
                                  if "tflite" in targets else (), notes=notes)
    if hub_results and not args.dry_run:
        text += "\n" + qnn.device_table(hub_results, device)
    scores = None
    if args.score_prompts:
        from export.litert_sampler import LiteRTScoreError, markdown

        try:
            scores = _score(args, cfg, transformer, out / "tflite", precisions)
            text += "\n" + markdown(scores)
        except LiteRTScoreError as err:
            print(f"neodragon export: --score-prompts: {err}", file=sys.stderr)
            results.append(report.ArtifactResult(component="end-to-end score", group="litert", backend="tflite",
                                                 precision=",".join(precisions), status="failed", message=str(err)))
    (out / "report.md").write_text(text)
    report.write_json(out / "report.json", {"config": cfg.name, "stack": stack, "components": rows,
                                            "artifacts": [r.as_dict() for r in results],
                                            **({"litert_scores": scores} if scores else {})})
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    bad = [r for r in results if r.status in ("failed", "not_converted")]
    return 1 if bad else 0


def _score(args, cfg, transformer, tflite_dir: Path, precisions) -> dict:
    """The JAX pipeline and the pipeline with each precision's LiteRT graphs, scored on held-out prompts."""
    from export.litert_sampler import score_exported
    from neodragon_jax.eval.heldout import heldout_prompts
    from neodragon_jax.pipelines.text_to_video import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_official(args.checkpoint, cfg, transformer=transformer)
    return score_exported(pipe, tflite_dir, precisions, heldout_prompts(args.score_prompts), threads=args.threads,
                          say=lambda m: print(m, flush=True))
