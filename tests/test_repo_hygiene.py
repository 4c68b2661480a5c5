"""What the commands write by default stays out of git, and the README starts from a virtual environment
(issue 23 item 9)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("path", ["outputs/video.mp4", "outputs/video_frames.png", "outputs/export/report.md",
                                  "runs/demo/report.md", "runs/flow-tiny/metrics.jsonl"])
def test_default_outputs_are_ignored_by_git(path):
    """`neodragon generate` writes outputs/video.mp4, `train` and `demo` write under runs/ by default."""
    res = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert res.returncode == 0, f"{path} is not ignored by .gitignore"


def test_readme_quick_start_creates_a_virtual_environment_before_installing():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick.index("-m venv .venv") < quick.index("source .venv/bin/activate") < quick.index("pip install")
    assert "Disk:" in quick and "GB" in quick
