"""Test setup: 8 simulated CPU devices (set before JAX initialises) and float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Partitionable threefry compiles each random kernel ~5x slower on CPU; tests need no partitionable RNG and
# model inits dominate the suite's compile time. Set through the environment so that subprocesses started
# by tests (kill-and-resume runs) draw the same random numbers as the test process.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# No persistent XLA cache in tests: `neodragon train` enables one process-wide, and executables cached by
# runs with other RNG settings would change random draws of later tests.
os.environ.setdefault("NEODRAGON_COMPILE_CACHE", "none")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SPEC_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "spec"


@pytest.fixture(scope="session")
def spec_dir() -> pathlib.Path:
    """The reference facts folder (../shared/spec beside the checkout)."""
    if not SPEC_DIR.is_dir():
        pytest.skip(f"spec folder {SPEC_DIR} not present")
    return SPEC_DIR


@pytest.fixture(scope="session")
def official_shapes(spec_dir):
    import json

    return json.loads((spec_dir / "state_dict_shapes.json").read_text())


@pytest.fixture(autouse=True)
def _jax_stays_32_bit():
    """Fail the test that leaves ``jax_enable_x64`` on (litert-torch sets it at import): every later test
    would silently compute in float64 and draw different random numbers."""
    assert not jax.config.jax_enable_x64, "jax_enable_x64 was already on before this test"
    yield
    if jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", False)
        pytest.fail("this test left jax_enable_x64 on process-wide (imported litert_torch outside "
                    "export.tflite.jax_x64_scope?)")


#: The files that take minutes (measured: each runs a CLI chain or compiles several training steps). The suite
#: runs in one xdist worker per core with whole files per worker; starting these first lets the short files
#: fill in around them instead of one long file finishing alone at the end.
LONG_FILES = ("tests/cli/test_dmd_cli.py", "tests/cli/test_demo.py", "tests/cli/test_prune.py",
              "tests/cli/test_eval_decoder_cli.py", "tests/train/test_multihost.py", "tests/train/test_multihost_stages.py",
              "tests/train/test_dmd.py",
              "tests/train/test_pruning.py", "tests/export/test_litert_sampler.py", "tests/export/test_tflite.py",
              "tests/export/test_mmdit_units.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    root = pathlib.Path(str(config.rootpath))

    def key(item):
        rel = pathlib.Path(str(item.path)).relative_to(root).as_posix()
        return rank.get(rel, len(LONG_FILES))

    items.sort(key=key)  # stable: the order within a file and among the other files is kept
