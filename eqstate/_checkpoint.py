"""Checkpoints: `eqstate.save` and `eqstate.load`.

A checkpoint file is Equinox's leaf serialisation (`eqx.tree_serialise_leaves`: one
`.npy` record per leaf) framed by a JSON header that names every leaf (path, kind,
shape, dtype) and a checksum over the whole file. It is written atomically: to a
temporary file in the same directory, flushed and fsynced, then renamed over the target.
"""

import glob
import hashlib
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._convert import is_array_or_abstract, is_key, stand_in
from ._filters import Filter, describe, is_none, select as _select
from ._resolve import plan
from ._shard import put


_T = TypeVar("_T")

_MAGIC = b"EQSTATE-CHECKPOINT\n"
_FORMAT = 1
_DIGEST = 32  # bytes of blake2b over everything before it
_TMP_SUFFIX = ".eqstate-tmp"
_SCALARS = (int, float, complex)  # Python bools are settings (`inference`): `like`'s

_MSG_NOT_CHECKPOINT = (
    "eqstate.load: {path} is not an eqstate checkpoint (it does not start with eqstate's "
    "header; it starts with {start!r}). Load files written by `eqstate.save`."
)
_MSG_CORRUPT = (
    "eqstate.load: {path} is damaged: {why}. It was truncated or changed after "
    "`eqstate.save` wrote it; load an earlier checkpoint."
)
_MSG_FORMAT = (
    "eqstate.load: {path} has checkpoint format {found}, but this eqstate (version "
    "{version}) reads format {ours}. Load it with the eqstate version that wrote it "
    "({writer})."
)
_MSG_MISSING = (
    "eqstate.load: the checkpoint {path} has no leaf at {where} ({what} in `like`){hint}."
)
_MSG_EXTRA = (
    "eqstate.load: the checkpoint {path} holds {where} ({what}), which `like` does not "
    "have: the structures differ. Load into a tree of the saved structure, put `None` in "
    "`like` where a part should not be loaded (e.g. `(model, None)` for a `(model, opt)` "
    "checkpoint), or pass filters to load only some kinds."
)
_MSG_MISMATCH = (
    "eqstate.load: at {where}, the checkpoint {path} holds {saved}, but `like` has "
    "{wanted}. Build `like` as the saved tree was built (same layer sizes, dtypes and "
    "kinds)."
)
_MSG_NO_DIR = (
    "eqstate.save: the directory {dir} of {path} does not exist. Create it first, e.g. "
    "`os.makedirs({dir!r}, exist_ok=True)`."
)
_MSG_NOTHING = (
    "eqstate.{fn}: no leaf of the tree matches the filters {filters}, so there is "
    "nothing to {verb}."
)
_MSG_SPREAD = (
    "eqstate.save: the array at {path} is split over devices of several processes, and "
    "this process holds only part of it. Save replicated arrays (each process then "
    "holds all of it), gather it first "
    "(`jax.experimental.multihost_utils.process_allgather`), or checkpoint sharded "
    "state with orbax (see the README)."
)
_MSG_SAME_PATH = (
    "eqstate.save: two leaves have the same path, {path}: their keys print alike (e.g. "
    "dict keys of a class with the same repr), so they could not be told apart when "
    "loading. Use keys that print differently."
)
_MSG_PATH = "eqstate.{fn}(path=...) must be a str or os.PathLike, got {value!r} ({type})."


def _is_data(x: Any) -> bool:
    """Whether `x` is a leaf a checkpoint holds: an array (concrete or abstract) or a
    Python number. Python bools (the `inference` flags) are not: `load` keeps `like`'s,
    so loading into `eqstate.eval(fresh)` gives a model in inference."""
    return is_array_or_abstract(x) or type(x) in _SCALARS


def _kind_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}".replace("eqstate._kinds.", "eqstate.")


def _entry(path: str, kind: type, x: Any) -> dict[str, Any]:
    if type(x) in _SCALARS:
        return {"path": path, "kind": _kind_name(kind), "python": type(x).__name__}
    entry: dict[str, Any] = {
        "path": path,
        "kind": _kind_name(kind),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
    }
    if isinstance(x, jax.Array) and is_key(x):
        entry["key_impl"] = str(jax.random.key_impl(x))
        entry["data_shape"] = list(jax.random.key_data(x).shape)
    return entry


def _describe(entry: dict[str, Any]) -> str:
    if "python" in entry:
        return f"a Python {entry['python']} of kind {entry['kind']}"
    return f"{entry['dtype']}{entry['shape']} of kind {entry['kind']}"


def _selected(
    tree: Any, filters: tuple[Filter, ...], fn: str
) -> tuple[list, Any, list[str], list[bool]]:
    """Flatten `tree`: its leaves, treedef, key paths, and which leaves a checkpoint holds
    (data leaves matching `filters`, or all data leaves without filters)."""
    leaves, p = plan(tree)
    paths = [jtu.keystr(k) for k in p.paths]
    data = [_is_data(x) for x in leaves]
    if filters:
        stand_ins = p.treedef.unflatten([stand_in(x) for x in leaves])
        _, _, match = _select(stand_ins, filters[0] if len(filters) == 1 else filters, fn)
        data = [d and m for d, m in zip(data, match)]
    return leaves, p, paths, data


def _write_leaf(f: Any, x: Any) -> None:
    if isinstance(x, jax.Array) and is_key(x):
        x = jax.random.key_data(x)
    np.save(f, np.asarray(x), allow_pickle=False)


_PYTHON = {"bool": bool, "int": int, "float": float, "complex": complex}


def _stored(entry: dict[str, Any]) -> Any:
    """What `eqx.tree_deserialise_leaves` reads for `entry`: a Python number, or a NumPy
    array (a key's raw data), here a zero-memory stand-in of its shape and dtype."""
    if "python" in entry:
        return _PYTHON[entry["python"]]()
    dtype = np.dtype(np.uint32 if "key_impl" in entry else entry["dtype"])
    shape = tuple(entry["data_shape"] if "key_impl" in entry else entry["shape"])
    return np.broadcast_to(np.zeros((), dtype), shape)


def _read_leaf(entry: dict[str, Any]) -> Callable[[Any, Any], Any]:
    def read(f: Any, like: Any) -> Any:
        value = np.load(f, allow_pickle=False)
        if "python" in entry:
            return _PYTHON[entry["python"]](value)
        if value.dtype != like.dtype:  # NumPy stores bfloat16, float8, ... as raw bytes
            value = value.view(like.dtype)
        return value

    return read


def _value(entry: dict[str, Any], stored: Any, like: Any) -> Any:
    """The loaded leaf: a key, a NumPy array where `like` has one (writeable, any
    dtype), else a JAX array on `like`'s devices."""
    if "python" in entry:
        return stored
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.Array) and not like.committed:
        sharding = None  # JAX's default placement, as `like`'s
    if "key_impl" in entry:
        value = jax.random.wrap_key_data(jnp.asarray(stored), impl=entry["key_impl"])
    elif isinstance(like, (np.ndarray, np.generic)):
        return np.array(stored)
    else:
        value = jnp.asarray(stored)
        if getattr(like, "weak_type", False) and value.shape == ():
            weak = jnp.asarray(value.item())  # as a Python number would give it
            value = weak if weak.dtype == value.dtype else value
    return value if sharding is None else put(value, sharding)


def _check_path(path: Any, fn: str) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_MSG_PATH.format(fn=fn, value=path, type=type(path).__name__))
    target = pathlib.Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"eqstate.{fn}(path=...) is the directory {str(target)!r}; give a file in it, "
            f"e.g. {str(target / 'checkpoint.eqs')!r}."
        )
    return target


def save(path: str | os.PathLike, tree: Any, *filters: Filter) -> None:
    """Write `tree` to a checkpoint file at `path`, atomically.

    A crash at any moment leaves either the previous file or the new one at `path`,
    never a torn one: the checkpoint is written to a temporary file in the same
    directory, flushed to disk, then renamed over `path`.

    **Arguments:**

    - `path`: the file to write (its directory must exist).
    - `tree`: any pytree of eqstate and Equinox modules, optimizers, metrics, arrays and
        Python numbers, e.g. `(model, opt)` or `{"model": model, "opt": opt}`. PRNG keys
        (typed or raw), bfloat16, integer and boolean arrays are kept bit for bit.
        Other leaves (static settings, functions, strings, and Python bools such as the
        `inference` flags) are not saved: `load` takes them from its `like`.
    - `*filters`: save only the array leaves matching these (kinds, or any filter of
        `eqstate.filter`), e.g. `eqstate.save(path, model, eqstate.BatchStat)`.

    The file carries a header naming each saved leaf (path, kind, shape and dtype), the
    eqstate version, and a checksum, which `eqstate.load` checks.

    **Returns:**

    `None`.

    !!! example

        ```python
        opt = eqstate.Optimizer(optax.adam(1e-3), model)
        eqstate.save("ckpt.eqs", (model, opt))
        eqstate.save("stats.eqs", model, eqstate.BatchStat)  # the running statistics only
        ```
    """
    target = _check_path(path, "save")
    leaves, _, paths, keep = _selected(tree, filters, "eqstate.save")
    if not any(keep):
        raise ValueError(
            _MSG_NOTHING.format(fn="save", filters=_filters_text(filters), verb="save")
        )
    kinds = plan(tree)[1].kinds
    chosen = [_local(x, p) for x, p, k in zip(leaves, paths, keep) if k]
    entries = [_entry(p, kind, x) for p, kind, x, k in zip(paths, kinds, leaves, keep) if k]
    seen: set[str] = set()
    for entry in entries:
        if entry["path"] in seen:
            raise ValueError(_MSG_SAME_PATH.format(path=entry["path"]))
        seen.add(entry["path"])
    payload = io.BytesIO()
    eqx.tree_serialise_leaves(payload, chosen, filter_spec=_write_leaf)
    from . import __version__

    header = {
        "format": _FORMAT,
        "eqstate": __version__,
        "filters": _filters_text(filters),
        "leaves": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = _MAGIC + len(head).to_bytes(8, "little") + head + payload.getvalue()
    _atomic_write(target, body + hashlib.blake2b(body, digest_size=_DIGEST).digest())


def _local(x: Any, path: str) -> Any:
    """`x` as this process holds it whole: a replicated array's local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(_MSG_SPREAD.format(path=path or "the root"))
        return x.addressable_data(0)
    return x


def _filters_text(filters: tuple) -> str:
    return ", ".join(describe(f) for f in filters) if filters else "none (every leaf)"


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the usual 0o022."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(_MSG_NO_DIR.format(dir=str(directory), path=str(path)))
    # temporary files are `.<name>.<pid>.<random>.eqstate-tmp`; those of writers that
    # died (a crash mid-save) are removed, those of live ones (a concurrent save) kept
    stem = "." + path.name[:200]
    for stale in directory.glob(glob.escape(stem) + ".*" + _TMP_SUFFIX):
        pid = stale.name[len(stem) + 1 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f"{stem}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: pathlib.Path) -> tuple[dict[str, Any], bytes]:
    """The header and payload of the checkpoint at `path`, checked."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_MAGIC):
        raise ValueError(_MSG_NOT_CHECKPOINT.format(path=str(path), start=data[:24]))
    size = len(_MAGIC) + 8
    if len(data) < size + _DIGEST:
        raise ValueError(_MSG_CORRUPT.format(path=str(path), why=f"it has {len(data)} bytes"))
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise ValueError(_MSG_CORRUPT.format(path=str(path), why="its checksum does not match"))
    head_len = int.from_bytes(data[len(_MAGIC) : size], "little")
    try:
        header = json.loads(body[size : size + head_len])
        entries = header["leaves"]
        if not isinstance(header, dict) or not isinstance(entries, list):
            raise TypeError("not a dict with a list of leaves")
    except (ValueError, KeyError, TypeError) as err:
        why = f"its header is not an eqstate header ({type(err).__name__}: {err})"
        raise ValueError(_MSG_CORRUPT.format(path=str(path), why=why)) from err
    from . import __version__

    if header.get("format") != _FORMAT:
        raise ValueError(
            _MSG_FORMAT.format(
                path=str(path),
                found=header.get("format"),
                ours=_FORMAT,
                version=__version__,
                writer=header.get("eqstate"),
            )
        )
    return header, body[size + head_len :]


def _under(path: str, prefixes: list[str]) -> bool:
    """Whether key path `path` lies under one of `prefixes` (key paths of subtrees)."""
    return any(path == p or (path.startswith(p) and path[len(p)] in ".[") for p in prefixes)


def load(path: str | os.PathLike, like: _T, *filters: Filter) -> _T:
    """Read the checkpoint at `path` into a tree of `like`'s structure.

    **Arguments:**

    - `path`: a file written by `eqstate.save`.
    - `like`: a tree of the saved structure: a freshly built model (and optimizer...),
        or `eqstate.abstract(...)` of one. Its static settings are kept; its array
        leaves (and Python numbers) are replaced by the saved ones. Put `None` where a
        saved part should be skipped: `eqstate.load(path, (model, None))` restores the
        model alone from a `(model, opt)` checkpoint.
    - `*filters`: load only the leaves matching these (kinds, or any filter of
        `eqstate.filter`); the others keep `like`'s values. E.g.
        `eqstate.load(path, fresh, eqstate.Param, eqstate.BatchStat)` restores parameters
        and running statistics and keeps a fresh optimizer state.

    **Returns:**

    `like` with the saved values, on the devices (shardings) of `like`'s arrays.

    **Raises:**

    `ValueError` naming the first path where the checkpoint and `like` differ (structure,
    shape, dtype or kind), and for a damaged, truncated or foreign file; nothing is
    returned half-loaded.

    !!! example

        ```python
        eqstate.save("ckpt.eqs", (model, opt))
        model, opt = eqstate.load("ckpt.eqs", (model, opt))  # into freshly built objects
        model, opt = eqstate.load("ckpt.eqs", eqstate.abstract((model, opt)))  # or shapes
        model, _ = eqstate.load("ckpt.eqs", (model, None))  # the model alone
        ```
    """
    source = _check_path(path, "load")
    header, payload = _read(source)
    saved = header["leaves"]
    leaves, p, paths, want = _selected(like, filters, "eqstate.load")
    if filters and not any(want):
        raise ValueError(
            _MSG_NOTHING.format(fn="load", filters=_filters_text(filters), verb="load")
        )
    by_path = {e["path"]: i for i, e in enumerate(saved)}
    expected = {
        pth: _entry(pth, kind, x) for pth, kind, x, w in zip(paths, p.kinds, leaves, want) if w
    }
    hint = ""
    if header.get("filters") and header["filters"] != _filters_text(()):
        hint = (
            f"; it was saved with the filters {header['filters']}: pass the same ones to "
            "`eqstate.load`"
        )
    for pth, entry in expected.items():
        if pth not in by_path:
            raise ValueError(
                _MSG_MISSING.format(
                    path=str(source), where=pth or "the root", what=_describe(entry), hint=hint
                )
            )
        found = saved[by_path[pth]]
        if _comparable(found) != _comparable(entry):
            raise ValueError(
                _MSG_MISMATCH.format(
                    where=pth or "the root",
                    path=str(source),
                    saved=_describe(found),
                    wanted=_describe(entry),
                )
            )
    if not filters:
        skipped = [jtu.keystr(k) for k, _ in jtu.tree_flatten_with_path(like, is_leaf=is_none)[0]]
        skipped = [s for s, x in zip(skipped, jtu.tree_leaves(like, is_leaf=is_none)) if x is None]
        for entry in saved:
            if entry["path"] not in expected and not _under(entry["path"], skipped):
                raise ValueError(
                    _MSG_EXTRA.format(path=str(source), where=entry["path"], what=_describe(entry))
                )
    try:
        stored = eqx.tree_deserialise_leaves(
            io.BytesIO(payload),
            [_stored(e) for e in saved],
            filter_spec=[_read_leaf(e) for e in saved],
        )
    except (ValueError, RuntimeError, EOFError) as err:  # a header that lies
        why = str(err).rstrip(".")
        raise ValueError(_MSG_CORRUPT.format(path=str(source), why=why)) from err
    out = [
        _value(saved[by_path[pth]], stored[by_path[pth]], x) if w else x
        for pth, x, w in zip(paths, leaves, want)
    ]
    return p.treedef.unflatten(out)


def _comparable(entry: dict[str, Any]) -> tuple:
    return tuple(entry.get(k) for k in ("kind", "shape", "dtype", "python"))


def abstract(tree: _T) -> _T:
    """`tree` with each array replaced by a `jax.ShapeDtypeStruct` (shape, dtype and
    sharding), everything else kept as it is: the `like` for `eqstate.load` (or an
    orbax restore) without allocating the arrays.

    Unlike `jax.eval_shape(make_model)`, static settings, `inference` flags and Python
    numbers stay Python values, so a restored model has the structure (and kinds) of a
    freshly built one and a jitted step does not compile again. (For orbax, restore into
    the arrays and numbers of it, e.g. `eqx.filter(eqstate.abstract(tree), ...)`, and
    `eqx.combine` the result with `tree`: orbax stores no functions; see the README.)

    **Arguments:**

    - `tree`: any pytree: models, optimizers, metrics, arrays (JAX or NumPy).

    **Returns:**

    A tree of `tree`'s structure, with a `jax.ShapeDtypeStruct` (keeping the weak type
    and, for JAX arrays, the sharding) in place of each array.

    !!! example

        ```python
        eqstate.save("ckpt.eqs", model)
        like = eqstate.abstract(model)  # allocates nothing
        model = eqstate.load("ckpt.eqs", like)
        ```
    """

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array):
            weak = bool(getattr(x, "weak_type", False))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=weak)
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jtu.tree_map(one, tree)
