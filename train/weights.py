"""One weight loader: any source (official folder, a run's checkpoint, an ``.npz``, a pruning of another
model) into any module or sub-tree of one, strictly.

Sources are written as short specs, the same strings a stage's roles take as their init source:

=====================================================  ==========================================================
``random``                                             keep the module's own initialisation
``official:PATH``                                      official safetensors: a file, a component folder, or a whole
                                                       official folder (the component's sub-folder is found by the
                                                       module's kind through ``neodragon_jax.convert.registry``)
``run:DIR[@STEP][:ema|:raw][#SUBTREE][->TARGET]``      a training run's Orbax checkpoint (``DIR`` = the run folder
                                                       or its ``checkpoints/``; latest step if no ``@STEP``; the
                                                       trained weights unless ``:ema``). ``SUBTREE`` starts with
                                                       the run's model name (``student``, ``mmdit``), optional when
                                                       the run trained one model
``npz:FILE[#SUBTREE][->TARGET]``                       an ``.npz`` of named arrays (``a.b.c`` or ``a/b/c`` names)
``prune:ROLE[i,j,...]``                                another role's MMDiT blocks ``i, j, ...`` (in that order;
                                                       ``prune:ROLE.CONTAINER[...]`` for another numbered list)
``release:NAME``                                       a release shipped in the package
                                                       (``neodragon_jax.releases``; its files checked against its
                                                       record), then read like ``official:`` its folder
=====================================================  ==========================================================

A module that is only a part of an official component (the teacher MMDiT's ``context_embedder`` alone:
``neodragon_jax.convert.registry.PART_OF``) takes from that component's file exactly the tensors its key map
names, and only those are read from disk.

``SUBTREE`` (dotted) picks part of the source; ``->TARGET`` (dotted) names the part of the module it fills
(default: the whole module). Every parameter of the target part must be filled exactly once with its shape,
or one :class:`~neodragon_jax.convert.keymap.CheckpointMismatchError` lists the missing, unexpected and
mis-shaped names. Values come back as host numpy arrays keyed by dotted parameter path; the engine casts
them to each parameter's dtype and places them straight into their shardings.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from neodragon_jax.convert.keymap import CheckpointMismatchError

#: The forms :func:`parse_source` accepts (the message of a refused spec lists them).
SOURCE_FORMS = (
    "random",
    "official:PATH",
    "run:DIR[@STEP][:ema|:raw][#SUBTREE][->TARGET]",
    "npz:FILE[#SUBTREE][->TARGET]",
    "prune:ROLE[i,j,...]",
    "release:NAME",
)
DEFAULT_PRUNE_CONTAINER = "transformer_blocks"


class WeightSourceError(ValueError):
    """A weight source spec that cannot be read; the message lists the valid forms."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
    kind: str  # random | official | run | npz | prune | release
    path: str = ""
    step: int | None = None
    ema: bool = False
    subtree: str = ""
    into: str = ""
    role: str = ""
    container: str = DEFAULT_PRUNE_CONTAINER
    kept: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "random":
            return "random"
        if self.kind == "prune":
            return f"prune:{self.role}.{self.container}[{','.join(map(str, self.kept))}]"
        s = f"{self.kind}:{self.path}"
        if self.kind == "run":
            s += (f"@{self.step}" if self.step is not None else "") + (":ema" if self.ema else "")
        return s + (f"#{self.subtree}" if self.subtree else "") + (f"->{self.into}" if self.into else "")


def _refuse(spec: str, why: str) -> WeightSourceError:
    return WeightSourceError(f"weight source {spec!r}: {why}; valid forms: {', '.join(SOURCE_FORMS)}")


def parse_source(spec: str | WeightSource) -> WeightSource:
    """``"run:runs/a@200:ema#student"`` -> :class:`WeightSource`; a bad spec names the valid forms."""
    if isinstance(spec, WeightSource):
        return spec
    text = str(spec).strip()
    if text in ("", "random"):
        return WeightSource("random")
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("official", "run", "npz", "prune", "release"):
        raise _refuse(text, f"unknown kind {kind!r}" if sep else "no kind")
    if not rest:
        raise _refuse(text, "nothing after the kind")
    if kind == "release":
        if not re.fullmatch(r"[\w.-]+", rest):
            raise _refuse(text, "expected release:NAME (a shipped release, e.g. release:tiny-teacher)")
        return WeightSource("release", path=rest)
    if kind == "prune":
        m = re.fullmatch(r"([A-Za-z_][\w]*)(?:\.([\w.]+))?\[([\d,\s]*)\]", rest)
        if not m:
            raise _refuse(text, "expected prune:ROLE[i,j,...]")
        kept = tuple(int(x) for x in m.group(3).replace(" ", "").split(",") if x)
        if not kept:
            raise _refuse(text, "no block kept")
        return WeightSource("prune", role=m.group(1), container=m.group(2) or DEFAULT_PRUNE_CONTAINER, kept=kept)
    into = ""
    if "->" in rest:
        rest, into = rest.rsplit("->", 1)
    subtree = ""
    if "#" in rest:
        rest, subtree = rest.split("#", 1)
    if kind == "official":
        if subtree or into:
            raise _refuse(text, "official sources fill a whole component (load a part through run: or npz:)")
        return WeightSource("official", path=rest)
    if kind == "npz":
        return WeightSource("npz", path=rest, subtree=subtree, into=into)
    ema = False
    for suffix, flag in ((":ema", True), (":raw", False)):
        if rest.endswith(suffix):
            rest, ema = rest[: -len(suffix)], flag
    step = None
    m = re.fullmatch(r"(.+)@(\d+)", rest)
    if m:
        rest, step = m.group(1), int(m.group(2))
    elif "@" in rest:
        raise _refuse(text, "STEP after @ must be a number")
    if not rest:
        raise _refuse(text, "no run folder")
    return WeightSource("run", path=rest, step=step, ema=ema, subtree=subtree, into=into)


# ------------------------------------------------------------------------------------------- flat trees
def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def flatten(tree: Any) -> dict[str, Any]:
    """Nested pure dict -> ``{"a.b.c": leaf}``."""
    return {".".join(_key(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def target_shapes(target: Any) -> dict[str, tuple[int, ...]]:
    """Dotted parameter path -> shape of an ``nnx.Module`` (concrete or abstract), an ``nnx.State`` or a pure
    dict of arrays / ``ShapeDtypeStruct``."""
    if isinstance(target, nnx.Module):
        target = nnx.state(target, nnx.Param)
    if isinstance(target, nnx.State):
        target = nnx.to_pure_dict(target)
    return {k: tuple(np.shape(v)) for k, v in flatten(target).items()}


def _select(flat: Mapping[str, Any], subtree: str, what: str) -> dict[str, Any]:
    if not subtree:
        return dict(flat)
    pre = subtree + "."
    out = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
    if subtree in flat:
        raise WeightSourceError(f"{what}: #{subtree} is one array, not a sub-tree")
    if not out:
        tops = sorted({k.split(".")[0] for k in flat})
        raise WeightSourceError(f"{what} has no sub-tree {subtree!r}; its top-level names: {', '.join(tops)}")
    return out


def check_and_place(loaded: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], into: str,
                    what: str) -> dict[str, np.ndarray]:
    """``loaded`` (paths relative to ``into``) checked strictly against the target part; returns paths of the
    whole target."""
    pre = into + "." if into else ""
    want = {k[len(pre):]: s for k, s in shapes.items() if k.startswith(pre)} if into else dict(shapes)
    if into and not want:
        tops = sorted({k.split(".")[0] for k in shapes})
        raise WeightSourceError(f"the target has no sub-tree {into!r} (->{into}); its top-level names: "
                                f"{', '.join(tops)}")
    missing = sorted(set(want) - set(loaded))
    unexpected = sorted(set(loaded) - set(want))
    misshaped = [(k, tuple(np.shape(loaded[k])), want[k]) for k in sorted(set(want) & set(loaded))
                 if tuple(np.shape(loaded[k])) != tuple(want[k])]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(what + (f" -> {into}" if into else ""), missing=missing, unexpected=unexpected,
                                      misshaped=misshaped)
    return {pre + k: np.asarray(v) for k, v in loaded.items()}


# ----------------------------------------------------------------------------------------------- sources
def read_safetensors_keys(path: str | Path, keys) -> dict[str, np.ndarray]:
    """The tensors named in ``keys`` that a safetensors file or folder holds (only those are read)."""
    from safetensors import safe_open

    from neodragon_jax.convert.io import CheckpointReadError, check_safetensors_file, safetensors_files

    keys, out = set(keys), {}
    for f in safetensors_files(path):
        check_safetensors_file(f)
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in sorted(keys & set(st.keys())):
                    out[k] = st.get_tensor(k)
        except Exception as err:  # noqa: BLE001 - SafetensorError carries no file name
            raise CheckpointReadError(f"{f}: cannot read this safetensors file ({type(err).__name__}: {err})") from None
    return out


def _official(src: WeightSource, module: nnx.Module) -> dict[str, np.ndarray]:
    from neodragon_jax.convert.io import param_shapes, read_safetensors
    from neodragon_jax.convert.registry import OFFICIAL_FOLDERS, PART_OF, component_kind, keymap_for

    if not isinstance(module, nnx.Module):
        raise WeightSourceError(f"{src}: an official source needs the module (its key map), not a bare tree")
    path = Path(src.path)
    kind = component_kind(module)
    if path.is_dir():
        for name in OFFICIAL_FOLDERS.get(kind, ()):
            if (path / name).is_dir():
                path = path / name
                break
    keymap = keymap_for(module)
    if kind in PART_OF:  # a part of another component's file: read just its own tensors
        return keymap.to_jax(read_safetensors_keys(path, keymap.torch_keys()), param_shapes(module))
    return keymap.to_jax(read_safetensors(path), param_shapes(module))


def release_folder(name: str) -> Path:
    """The folder of the shipped release ``name``, its files checked against its record."""
    from neodragon_jax.releases import ReleaseError, get_release

    try:
        release = get_release(name)
        release.verify()
    except ReleaseError as e:
        raise WeightSourceError(f"release:{name}: {e} (or name an official folder, official:DIR, or random)") from None
    return release.folder


def checkpoints_folder(path: str | Path) -> Path:
    """A run folder (``DIR/checkpoints``) or its checkpoints folder itself."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def run_state(path: str | Path, step: int | None = None) -> tuple[int, dict]:
    """``(step, trained state as host numpy)`` of a run's Orbax checkpoint (latest step if ``step`` is None)."""
    import orbax.checkpoint as ocp

    folder = checkpoints_folder(path).absolute()
    if not folder.is_dir():
        raise WeightSourceError(f"run:{path}: no such run folder (expected DIR or DIR/checkpoints with STEP/ folders)")
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise WeightSourceError(f"run:{path}: no complete checkpoint under {folder}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise WeightSourceError(f"run:{path}@{step}: no checkpoint at step {step}; steps: {steps}")
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the item is read without its manager, which orbax reports as a warning
    try:
        ckptr = ocp.PyTreeCheckpointer()
        item = folder / str(step) / "state"
        meta = ckptr.metadata(item)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        tree = getattr(tree, "tree", tree)
        # Every array as host numpy: the weights are placed into the new run's shardings afterwards.
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        absl.setLevel(level)
    return step, state


def _run(src: WeightSource) -> dict[str, np.ndarray]:
    step, state = run_state(src.path, src.step)
    which = "ema" if src.ema else "params"
    models = state.get(which) or {}
    if not models:
        raise WeightSourceError(f"{src}: the run at step {step} has no {'EMA' if src.ema else 'trained'} weights"
                                + (" (it kept no EMA: use :raw)" if src.ema else ""))
    flat = flatten(models)
    subtree = src.subtree
    if not subtree:
        if len(models) != 1:
            raise WeightSourceError(f"{src}: the run trained {sorted(models)}; name one with #MODEL")
        subtree = next(iter(models))
    return _select(flat, subtree, f"run {src.path}@{step}")


def _npz(src: WeightSource) -> dict[str, np.ndarray]:
    path = Path(src.path)
    if not path.is_file():
        raise WeightSourceError(f"npz:{src.path}: no such file")
    with np.load(path) as z:
        flat = {k.replace("/", "."): np.asarray(z[k]) for k in z.files}
    return _select(flat, src.subtree, f"npz {src.path}")


def prune_tree(flat: Mapping[str, Any], kept: tuple[int, ...], container: str = DEFAULT_PRUNE_CONTAINER) -> dict:
    """A pruned copy of ``flat``: the entries ``container.<kept[i]>.*`` become ``container.<i>.*``, the other
    numbered entries are dropped, everything outside ``container`` is kept."""
    pre = container + "."
    n = len({k[len(pre):].split(".")[0] for k in flat if k.startswith(pre)})
    if n == 0:
        raise WeightSourceError(f"prune: the source has no numbered {container!r} list")
    bad = [k for k in kept if not 0 <= k < n]
    if bad:
        raise WeightSourceError(f"prune: kept {list(bad)} out of range: the source has {container} 0..{n - 1}")
    where = {k: i for i, k in enumerate(kept)}
    out = {}
    for k, v in flat.items():
        if not k.startswith(pre):
            out[k] = v
            continue
        idx, rest = k[len(pre):].split(".", 1)
        if int(idx) in where:
            out[f"{pre}{where[int(idx)]}.{rest}"] = v
    return out


def read_source(src: WeightSource | str, module: Any = None, *, roles: Mapping[str, Mapping] | None = None
                ) -> dict[str, np.ndarray] | None:
    """The raw arrays of ``src`` (dotted paths relative to the part they fill); None for ``random``.

    ``module``: the target module (official sources need its key map); ``roles``: already initialised
    roles' flat host params by name (``prune`` sources read one).
    """
    src = parse_source(src)
    if src.kind == "random":
        return None
    if src.kind == "official":
        return _official(src, module)
    if src.kind == "release":
        return _official(WeightSource("official", path=str(release_folder(src.path))), module)
    if src.kind == "run":
        return _run(src)
    if src.kind == "npz":
        return _npz(src)
    roles = roles or {}
    if src.role not in roles:
        raise WeightSourceError(f"{src}: unknown role {src.role!r}; roles initialised before this one: "
                                f"{', '.join(sorted(roles)) or '(none)'}")
    return prune_tree(roles[src.role], src.kept, src.container)


def load_weights(source: WeightSource | str, target: Any, *, roles: Mapping[str, Mapping] | None = None
                 ) -> dict[str, np.ndarray] | None:
    """Weights of ``source`` for ``target`` (an ``nnx.Module``, concrete or abstract, an ``nnx.State`` or a
    pure dict of arrays / shapes): ``{dotted param path: host array}`` covering the target (or its
    ``->TARGET`` part) exactly; None for ``random``."""
    src = parse_source(source)
    raw = read_source(src, target, roles=roles)
    if raw is None:
        return None
    return check_and_place(raw, target_shapes(target), src.into, str(src))


def assign(module: nnx.Module, flat: Mapping[str, np.ndarray]) -> nnx.Module:
    """Write ``{dotted path: array}`` into ``module``'s parameters in place (cast to each one's dtype)."""
    from neodragon_jax.convert.io import assign_params

    assign_params(module, flat)
    return module


def merge_into(pure: Any, flat: Mapping[str, Any]) -> Any:
    """``pure`` (a nested pure dict) with the leaves named in ``flat`` (dotted paths) replaced."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    return jax.tree_util.tree_unflatten(
        treedef, [flat.get(".".join(_key(k) for k in path), leaf) for path, leaf in leaves])
