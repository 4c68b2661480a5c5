"""The README's full-size path (320x512, Pyramid Flow SD3 -> Neodragon on a pod), dry-run: every `train` line runs
with `--dry-run` at full size (config, stage settings, each role's parameter count from the abstract model,
weight sources, data and mesh checked; nothing read or allocated) and every other line is parsed by the real
argument parser. The pod's inputs stand in as files of the full-size shapes: one record, and the pruned
student folder's transformer config (what `prune select` writes)."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from neodragon_cli.main import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- full-size-path:"


def section_commands() -> tuple[dict[str, str], list[str]]:
    """The block's shell variables (its first line) and its commands, continuation lines joined."""
    text = README.read_text()
    assert MARKER in text, "the README lost its full-size path block"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    variables = dict(re.findall(r'(\w+)=("[^"]*"|[^;\s]+)', lines[0]))
    variables = {k: v.strip('"') for k, v in variables.items()}
    commands = [ln.strip() for ln in lines[1:] if ln.strip() and not ln.strip().startswith("#")]
    return variables, commands


def _record(path: Path, shapes: dict) -> None:
    arrays = {k: (np.ones(s, np.int32) if k.endswith("_mask") else np.zeros(s, np.float32)) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def pod_inputs(tmp_path_factory):
    from neodragon_jax.config import load_config
    from neodragon_jax.pipelines.official import OURS
    from train import stages

    root = tmp_path_factory.mktemp("pod")
    env = {name: str(root / name.lower()) for name in ("PF", "NEO", "VIDEOS", "DATA", "CORPUS", "RUNS", "OUT")}
    env.update(PROMPT_FILES=str(root / "prompts.txt"), HOST="0", HOSTS="8")
    for name in ("PF", "NEO", "VIDEOS", "CORPUS"):
        Path(env[name]).mkdir()
    Path(env["PROMPT_FILES"]).write_text("a cat surfing a wave at sunset\n")
    shapes = stages.get_stage("flow", load_config("pyramid-flow-sd3-320p", [])).geometry.shapes()
    _record(Path(env["DATA"]) / "records" / "000000.npz", shapes)
    _record(Path(env["RUNS"]) / "synth" / "records" / "000000.npz", shapes)
    kept = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 21, 22, 23]
    env["KEPT"] = json.dumps(kept).replace(" ", "")
    transformer = Path(env["RUNS"]) / "student" / "diffusion_transformer_384p"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(json.dumps({OURS: {"teacher_block_indices": kept}}))
    (Path(env["RUNS"]) / "td-targets").mkdir(parents=True)  # what `text-distill cache` writes
    (Path(env["RUNS"]) / "td-targets" / "manifest.json").write_text("{}")
    for run, stage in (("s1", "recover-flow"), ("s2", "recover-distill")):  # the runs' own config.json
        (Path(env["RUNS"]) / run).mkdir()
        (Path(env["RUNS"]) / run / "config.json").write_text(json.dumps({"train": {"stage": stage}}))
    return env


def _expand(command: str, variables: dict[str, str]) -> list[str]:
    out = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], command)
    return shlex.split(out)


def test_every_train_line_dry_runs_at_full_size(pod_inputs, capsys):
    block_vars, commands = section_commands()
    variables = {**pod_inputs}
    variables.update({k: re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], v) for k, v in block_vars.items()})
    trained = {}
    for command in commands:
        argv = _expand(command, variables)
        assert argv[0] == "neodragon", command
        if argv[1] != "train":
            continue
        code = main(argv[1:] + ["--dry-run"])
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n{out}\n{err}"
        assert "dry run: ok" in out and "Traceback" not in err
        trained[argv[2]] = out
    assert set(trained) == {"text-distill", "decoder", "recover-flow", "recover-distill", "dmd"}
    # full size, not the tiny world: the 18-block student beside the 24-block teacher
    assert re.search(r"student\s+trained\s+1,5\d\d,\d{3},\d{3} params", trained["recover-distill"])
    assert re.search(r"teacher\s+frozen\s+2,0\d\d,\d{3},\d{3} params", trained["recover-distill"])
    assert re.search(r"generator\s+trained\s+1,5\d\d,\d{3},\d{3} params", trained["dmd"])
    assert "(256 devices)" in trained["recover-flow"] or "256 devices" in trained["recover-flow"]


def test_every_other_line_parses(pod_inputs):
    block_vars, commands = section_commands()
    variables = {**pod_inputs}
    variables.update({k: re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], v) for k, v in block_vars.items()})
    parser = build_parser()
    verbs = set()
    for command in commands:
        argv = _expand(command, variables)
        if argv[1] == "train":
            continue
        args = parser.parse_args(argv[1:])  # an unknown flag exits 2 here
        assert callable(args.func), command
        verbs.add(" ".join(argv[1:3]) if argv[1] in ("text-distill", "prune", "export") else argv[1])
    assert {"extract", "text-distill corpus", "text-distill cache", "prune importance", "prune select", "synthesize",
            "release", "export all"} <= verbs


def test_a_wrong_line_is_caught(pod_inputs, capsys):
    """The dry run fails (exit 2, every problem listed) where the pod run would: missing sources, a batch that
    does not split over the mesh."""
    argv = ["train", "recover-distill", "--config", "pyramid-flow-sd3-320p", "--set", "mesh.data=8", "--set",
            "mesh.fsdp=32", "--batch", "100", "--records", pod_inputs["DATA"] + "/records",
            "--set", f"stages.recover-distill.student={pod_inputs['RUNS']}/student",
            "--set", f"stages.recover-distill.init=run:{pod_inputs['RUNS']}/s1:ema",
            "--set", "stages.recover-distill.teacher=official:/nowhere/pf", "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not split over the 256 devices" in err and "'/nowhere/pf' does not exist" in err


def test_a_missing_target_cache_is_caught(pod_inputs, capsys):
    argv = ["train", "text-distill", "--config", "pyramid-flow-sd3-320p", "--set", f"data.path={pod_inputs['CORPUS']}",
            "--set", f"stages.text-distill.teacher_init=official:{pod_inputs['PF']}",
            "--set", "stages.text-distill.targets=cache", "--set", "stages.text-distill.cache_dir=/nowhere/targets",
            "--dry-run"]
    assert main(argv) == 2
    assert "holds no target cache" in capsys.readouterr().err
