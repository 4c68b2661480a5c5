"""The demo's progress reader follows metrics.jsonl through what a resumed run does to it: the file is
rewritten without the replayed steps (and without a line torn by a kill) while the reader holds an offset
into the old one. The reader used to seek into the middle of a line of the new file and die on the JSON."""

import json
import os

from neodragon_cli.demo import TrainProgress


def _rows(steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "step_time": 0.5}) + "\n" for s in steps)


def test_progress_survives_a_rewritten_metrics_file_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(range(0, 40)) + '{"step": 40, "lo')  # a kill tore the last line
    progress = TrainProgress("flow", path, total=100, keys=("loss",))
    progress._read()  # started after the file existed: nothing yet
    assert progress.last is None

    # The resumed run (checkpoint at step 20) rewrites the file shorter, then appends.
    tmp = tmp_path / ".metrics.jsonl.tmp"
    tmp.write_text(_rows(range(0, 20)))
    os.replace(tmp, path)
    with open(path, "a") as f:
        f.write(_rows(range(20, 25)) + "not json\n")
    progress._read()
    assert progress.last["step"] == 24
    assert progress.line().startswith("[flow] step 25/100 (25%)")

    with open(path, "a") as f:
        f.write(_rows([25]) + '{"step": 26')  # a line still being written is left for the next read
    progress._read()
    assert progress.last["step"] == 25
    with open(path, "a") as f:
        f.write(', "loss": 0.5, "step_time": 0.5}\n')
    progress._read()
    assert progress.last["step"] == 26 and progress.last["loss"] == 0.5
