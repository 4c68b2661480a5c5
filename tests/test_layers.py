"""The layer rule: ``neodragon_jax`` (the library) never imports ``train/``, ``export/``, the CLI or torch when
it is imported; only the reverse direction exists (DESIGN.md "Layout")."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("train", "export", "neodragon_cli", "torch")

PROBE = r"""
import importlib, json, pkgutil, sys
import neodragon_jax
names = sorted(m.name for m in pkgutil.walk_packages(neodragon_jax.__path__, "neodragon_jax."))
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"modules": names, "bad": bad}))
"""


def test_library_imports_no_higher_layer_and_no_torch():
    proc = subprocess.run([sys.executable, "-c", PROBE % (FORBIDDEN,)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["modules"]) > 30 and "neodragon_jax.convert.registry" in out["modules"]
    assert out["bad"] == [], f"importing neodragon_jax pulled in {out['bad']}"
