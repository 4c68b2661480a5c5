"""`neodragon <verb>`: plan, generate, train, bench, ...

Each verb parses its own flags and imports its implementation lazily, so `neodragon --help` is instant and
a verb that needs an optional extra fails only when used.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    p.add_argument("--config", default=default, help="preset name in configs/ or a path to a .toml preset")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, repeatable (e.g. --set model.mmdit.num_layers=18)",
    )


def _load(args):
    from neodragon_jax.config import load_config

    return load_config(args.config, args.overrides)


def cmd_plan(args) -> int:
    if args.topology:
        from neodragon_cli.plan_tpu import run

        return run(args)
    if args.mesh:
        from neodragon_cli.train import plan_mesh

        return plan_mesh(args)
    if args.stage or args.batch:
        print("neodragon plan: --stage/--batch plan a train step and need --mesh data=A,fsdp=B,tensor=C",
              file=sys.stderr)
        return 2
    from neodragon_jax.plan import format_table, plan

    presets = args.config or ["pyramid-flow-sd3-320p", "neodragon-320p"]
    reports = []
    for preset in presets:
        from neodragon_jax.config import load_config

        cfg = load_config(preset, args.overrides)
        comps = plan(cfg, args.parts)
        if args.json:
            reports.append({"config": cfg.name, "components": [c.as_dict() for c in comps]})
        else:
            print(format_table(cfg, comps))
            print()
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neodragon", description="Neodragon text-to-video in JAX: plan, train, generate, export."
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("plan", help="parameter counts and FLOPs per component, computed without allocating")
    p.add_argument("--config", action="append", default=None,
                   help="preset(s) to plan, repeatable (default: both full-size presets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set model.mmdit.num_layers=20)")
    p.add_argument("--parts", nargs="+", default=["text", "video"], choices=["text", "video"], help="which parts to plan")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.add_argument("--mesh", default=None, metavar="data=A,fsdp=B,tensor=C",
                   help="instead: compile the full train step ahead of time for this mesh (simulated devices) "
                        "and print per-device memory and FLOPs")
    p.add_argument("--topology", default=None, metavar="GEN:SHAPE",
                   help="instead: compile every stage's train step with the TPU compiler for this TPU topology "
                        "(v5e:4x4, v5e:16x16, v5p:2x2x2, v6e:4x4, ...; needs the tpu extra, runs on a CPU host) and "
                        "print per-chip memory, FLOPs, estimated step time, MFU and which chips it fits; "
                        "--mesh defaults to data=1,fsdp=CHIPS, --batch to 2 per chip")
    p.add_argument("--stage", default=None,
                   help="with --mesh: which train step, flow (default), dmd (generator + fake score + real score), "
                        "text-distill or decoder; "
                        "with --topology: all (default) or a comma list of flow,vae,text-distill,decoder,"
                        "recover-distill,dmd")
    p.add_argument("--batch", type=int, default=None,
                   help="with --mesh: global batch (default 4 per batch-sharding device; with --topology 2 per chip)")
    p.add_argument("--depth-probe", default=None, metavar="A,B",
                   help="with --mesh: compile at A and B MMDiT blocks and extrapolate every figure to the "
                        "configured depth (minutes instead of tens of minutes on a CPU; see README 'Planning')")
    p.set_defaults(func=cmd_plan)

    from neodragon_cli import bench, train

    p = sub.add_parser("train", help="run a training stage (flow, toy, ...) with checkpoints in a workdir")
    train.add_train_arguments(p)
    p.set_defaults(func=train.run_train)

    from neodragon_cli import launch

    p = sub.add_parser("launch", help="run a command (e.g. `train flow ...`) as N JAX processes on this machine "
                                      "(CPU devices, gloo collectives): a local rehearsal of a multi-host run")
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)

    p = sub.add_parser("bench", help="benchmarks: `bench train` (step time, tokens/s, MFU, plan memory table)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    from neodragon_cli import generate

    p = sub.add_parser("generate", help="text -> video (mp4, gif, contact sheet, JSON sidecar)")
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)

    from neodragon_cli import demo

    p = sub.add_parser("demo", help="train VAE + flow teacher on synthetic videos, generate held-out prompts, "
                                    "score, write report.md (--quick: a one-minute smoke run)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    from neodragon_cli import text_distill

    p = sub.add_parser("text-distill", help="text-encoder distillation: prompt corpus, teacher-target cache, eval "
                                            "(report.md), export of the Neodragon folder, the tiny-domain ablation")
    text_distill.add_arguments(p)
    p.set_defaults(func=text_distill.run)

    from neodragon_cli import dmd

    p = sub.add_parser("synthesize", help="the teacher's videos for a prompt list as training records (DMD data; "
                                          "batched, resumable)")
    dmd.add_synthesize_arguments(p)
    p.set_defaults(func=dmd.run_synthesize)

    p = sub.add_parser("dmd", help="`dmd eval --run DIR`: teacher vs the DMD generator (1-1-1, 4-4-4, hybrid) on "
                                   "held-out prompts; `dmd export`: the generator as an official folder")
    dmd.add_dmd_arguments(p)
    p.set_defaults(func=dmd.run_dmd)

    from neodragon_cli import extract

    p = sub.add_parser("extract", help="a captioned video folder -> the teacher's training records (VAE latents, "
                                       "text features; resumable): the data of train flow / recover-*")
    extract.add_arguments(p)
    p.set_defaults(func=extract.run)

    from neodragon_cli import prune

    p = sub.add_parser("prune", help="block pruning: importance (JSON + chart), single-block ablations, select the "
                                     "kept blocks (the student's official folder), eval against the teacher")
    prune.add_arguments(p)
    p.set_defaults(func=prune.run)

    from neodragon_cli import recipe

    p = sub.add_parser("recipe", help="the whole Neodragon path from the shipped tiny teacher: text-encoder and "
                                      "decoder distillation, pruning + recovery, pyramidal DMD, Neodragon-tiny, "
                                      "export; one report")
    recipe.add_arguments(p)
    p.set_defaults(func=recipe.run)

    from neodragon_cli import release

    p = sub.add_parser("release", help="trained runs -> a shipped release: official folder layout, evaluated on "
                                       "held-out prompts, release.json record (what `generate --model` loads)")
    release.add_arguments(p)
    p.set_defaults(func=release.run)

    from neodragon_cli import export

    p = sub.add_parser("export", help="TFLite / ONNX / Qualcomm AI Hub export, checked against the PyTorch mirror")
    export.add_arguments(p)
    p.set_defaults(func=export.run)

    from neodragon_cli import convert, eval_decoder

    p = sub.add_parser("eval", help="`eval decoder --run DIR`: a decoder-distillation run against the native "
                                    "decoder (PSNR/SSIM per frame, speed, size, scorer on the teacher's videos)")
    eval_decoder.add_arguments(p)
    p.set_defaults(func=eval_decoder.run)

    p = sub.add_parser("convert", help="`convert lpips --vgg FILE.pth`: user-supplied weights -> the files this "
                                       "project loads")
    convert.add_arguments(p)
    p.set_defaults(func=convert.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from neodragon_jax.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"neodragon {args.verb}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks a training run to checkpoint and stop)
        print(f"neodragon {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
