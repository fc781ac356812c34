"""`eqstate.summary` and `eqstate.diff`: tables of a model's arrays, by kind.

Both return small objects holding the numbers (rows and totals) that render as a text
table (`print`, `repr`) and as HTML in Jupyter (`_repr_html_`). The tables are drawn by
`rich`, imported on first rendering.
"""

import io
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from . import _treescope
from ._convert import is_array_or_abstract
from ._filters import first_mismatch
from ._kinds import BatchStat, Kind, OptState, Param, Rng, State
from ._resolve import plan


_MSG_STRUCTURE = (
    "eqstate.diff(before, after): the two trees differ in structure {where}, so their "
    "leaves cannot be paired. Compare two versions of one model, such as the model "
    "before and after a training step."
)
_MSG_NOT_CONCRETE = (
    "eqstate.diff(before, after) compares values, but the leaf at {path} is {what}. Pass "
    "concrete arrays (outside `jax.jit`, not `eqstate.abstract` trees); "
    "`eqstate.summary` describes shapes and dtypes only."
)

# colours for the kind column; a kind of your own takes that of its nearest built-in base
_COLOURS = {OptState: "green", Rng: "yellow", BatchStat: "magenta", State: "blue", Param: "cyan"}
_treescope.register()  # where treescope is installed: modules render with their kinds

_HTML = (
    '<pre style="white-space:pre;overflow-x:auto;line-height:normal;'
    "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">{code}</pre>"
)


class SummaryRow(NamedTuple):
    """One array of `eqstate.summary`: where it is, its kind, shape, dtype and size."""

    path: str
    kind: type[Kind]
    shape: tuple[int, ...]
    dtype: Any
    size: int
    nbytes: int


class Total(NamedTuple):
    """How many arrays, elements and bytes (a PRNG key counts as one element, with the
    bytes of its key data)."""

    arrays: int
    size: int
    nbytes: int


class Summary:
    """What `eqstate.summary(tree)` returns; prints as a table.

    **Attributes:**

    - `rows`: a `SummaryRow(path, kind, shape, dtype, size, nbytes)` per array leaf, in
        `jax.tree_util.tree_leaves` order.
    - `totals`: `{kind: Total(arrays, size, nbytes)}`, kinds in order of appearance.
    - `total`: the `Total` over every array.
    - `others`: `(path, value)` of the leaves that are not arrays (flags such as
        `inference`), which kinds and totals leave out.
    """

    def __init__(self, name: str, rows: list[SummaryRow], others: list[tuple[str, Any]]):
        self.name = name
        self.rows = tuple(rows)
        self.others = tuple(others)
        totals: dict[type[Kind], list[int]] = {}
        for r in rows:
            t = totals.setdefault(r.kind, [0, 0, 0])
            t[0], t[1], t[2] = t[0] + 1, t[1] + r.size, t[2] + r.nbytes
        self.totals = {k: Total(*t) for k, t in totals.items()}
        self.total = Total(len(rows), sum(r.size for r in rows), sum(r.nbytes for r in rows))

    def __rich__(self) -> Any:
        from rich.text import Text

        table = _table(("path", "kind", "shape", "dtype", "elements", "bytes"))
        for r in self.rows:
            shape = str(r.shape)
            table.add_row(Text(r.path), _kind(r.kind), shape, str(r.dtype), *_sizes(r))
        table.add_section()
        for k, t in self.totals.items():
            table.add_row(_count(t.arrays, "array"), _kind(k), "", "", *_sizes(t))
        table.add_row(_count(self.total.arrays, "array"), "total", "", "", *_sizes(self.total))
        title = ", ".join(_headline(k, t) for k, t in self.totals.items()) or "no arrays"
        notes = []
        if self.others:
            listed = ", ".join(p for p, _ in self.others[:4])
            more = f", ... ({len(self.others) - 4} more)" if len(self.others) > 4 else ""
            notes.append(
                f"Not counted: {_count(len(self.others), 'leaf', 'leaves')} that "
                f"{'is' if len(self.others) == 1 else 'are'} not an array ({listed}{more})"
            )
        return _group(f"{self.name}: {title}", table, notes)

    def __str__(self) -> str:
        return _render(self, html=False)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return _render(self, html=True)


def summary(tree: Any) -> Summary:
    """A table of the arrays in `tree`: path, kind, shape, dtype, elements and bytes,
    with totals per kind.

    **Arguments:**

    - `tree`: any pytree: a model, `(model, opt)`, an `eqstate.abstract` tree of
        `jax.ShapeDtypeStruct`s, or traced arrays inside `jax.jit`.

    **Returns:**

    A `Summary`, which prints as a text table and shows as HTML in Jupyter; its `rows`,
    `totals` (per kind) and `total` hold the numbers. A PRNG key counts as one element
    of its key dtype, with the bytes of its key data. Leaves that are not arrays
    (`inference` flags, Python numbers) are listed under the table and not counted.

    !!! example

        ```python
        print(eqstate.summary(model))
        n_params = eqstate.summary(model).totals[eqstate.Param].size  # 172
        # (totals are per kind exactly: add a subclass such as NoDecay(Param) yourself)
        ```

        ```text
        Model: Param 172 (688 B), BatchStat 32 (128 B), Rng 1 (8 B)
         ──────────────────────────────────────────────────────────────────────
          path               kind        shape     dtype      elements   bytes
         ──────────────────────────────────────────────────────────────────────
          .linear1.weight    Param       (16, 3)   float32          48   192 B
          .linear1.bias      Param       (16,)     float32          16    64 B
          ...
          .bn.running_mean   BatchStat   (16,)     float32          16    64 B
          .bn.running_var    BatchStat   (16,)     float32          16    64 B
          .drop.key          Rng         ()        key<fry>          1     8 B
          ...
         ──────────────────────────────────────────────────────────────────────
          8 arrays           Param                                 172   688 B
          2 arrays           BatchStat                              32   128 B
          1 array            Rng                                     1     8 B
          11 arrays          total                                 205   824 B
         ──────────────────────────────────────────────────────────────────────
        Not counted: 2 leaves that are not an array (.bn.inference, .drop.inference)
        ```
    """
    leaves, p = plan(tree)
    rows, others = [], []
    for where, kind, leaf in zip(_wheres(tree, p.paths), p.kinds, leaves):
        if is_array_or_abstract(leaf):
            shape = tuple(leaf.shape)
            size = math.prod(shape)
            rows.append(
                SummaryRow(where, kind, shape, leaf.dtype, size, size * leaf.dtype.itemsize)
            )
        else:
            others.append((where, leaf))
    return Summary(type(tree).__name__, rows, others)


class DiffRow(NamedTuple):
    """One changed leaf of `eqstate.diff`.

    `kind` is `None` for a leaf that is not an array. `changed` counts the elements
    that differ (keys for a key array), out of `size`; both are `None` where the shape
    or dtype changed. `max_abs` is the largest absolute change of a number array
    (`nan` where a NaN appeared or went), `None` otherwise. `change` says it in words.
    """

    path: str
    kind: type[Kind] | None
    shape: str
    dtype: str
    changed: int | None
    size: int | None
    max_abs: float | None
    change: str


class Diff:
    """What `eqstate.diff(before, after)` returns; prints as a table of the changes.

    **Attributes:**

    - `rows`: a `DiffRow` per changed leaf, in `jax.tree_util.tree_leaves` order.
    - `arrays`: the number of array leaves compared.
    - `changed`: `{kind: number of changed arrays}`, kinds in order of appearance.

    `bool(diff)` is whether anything changed.
    """

    def __init__(self, name: str, rows: list[DiffRow], arrays: int):
        self.name = name
        self.rows = tuple(rows)
        self.arrays = arrays
        self.changed: dict[type[Kind], int] = {}
        for r in rows:
            if r.kind is not None:
                self.changed[r.kind] = self.changed.get(r.kind, 0) + 1

    def __bool__(self) -> bool:
        return bool(self.rows)

    @property
    def headline(self) -> str:
        """One line: `3 of 9 arrays changed: BatchStat 2, Rng 1`."""
        n = sum(self.changed.values())
        line = f"{n} of {_count(self.arrays, 'array')} changed"
        if self.changed:
            line += ": " + ", ".join(f"{k.__name__} {c}" for k, c in self.changed.items())
        others = len(self.rows) - n
        if others:
            line += f"; {_count(others, 'other leaf', 'other leaves')} changed"
        return line

    def __rich__(self) -> Any:
        from rich.text import Text

        table = _table(("path", "kind", "shape", "dtype", "changed", "max |Δ| / change"))
        for r in self.rows:
            changed = "" if r.changed is None else f"{r.changed:,} of {r.size:,}"
            kind = Text("not an array", style="dim") if r.kind is None else _kind(r.kind)
            table.add_row(Text(r.path), kind, r.shape, r.dtype, changed, Text(r.change))
        return _group(f"{self.name}: {self.headline}", table if self.rows else None, [])

    def __str__(self) -> str:
        return _render(self, html=False)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return _render(self, html=True)


def diff(before: Any, after: Any) -> Diff:
    """Which leaves changed between two versions of a model, and by how much.

    **Arguments:**

    - `before`, `after`: two pytrees of the same structure (the same static fields
        too), such as a model before and after a training step, with concrete arrays.

    **Returns:**

    A `Diff`, which prints as a table of the changed leaves (path, kind, shape, dtype,
    how many elements changed and the largest absolute change; "key changed" for PRNG
    keys, "shape/dtype changed" where they differ) under a line such as
    `3 of 9 arrays changed: BatchStat 2, Rng 1`, and shows as HTML in Jupyter. `rows`
    and `changed` (per kind) hold the numbers; `bool(diff)` is whether anything changed.

    **Raises:**

    `ValueError` naming the first path where the structures differ; `TypeError` for a
    traced or abstract (`jax.ShapeDtypeStruct`) leaf.

    !!! example

        ```python
        new_model, opt, loss = train_step(model, opt, x, y)
        print(eqstate.diff(model, new_model))
        print(eqstate.diff(model, eqstate.eval(model)))  # the inference flags
        ```

        ```text
        Model: 11 of 11 arrays changed: Param 8, BatchStat 2, Rng 1
         ─────────────────────────────────────────────────────────────────────────────────
          path               kind        shape     dtype       changed   max |Δ| / change
         ─────────────────────────────────────────────────────────────────────────────────
          .linear1.weight    Param       (16, 3)   float32    48 of 48   0.001
          ...
          .bn.running_mean   BatchStat   (16,)     float32    16 of 16   0.00638
          .bn.running_var    BatchStat   (16,)     float32    16 of 16   0.00992
          .drop.key          Rng         ()        key<fry>     1 of 1   key changed
          ...
         ─────────────────────────────────────────────────────────────────────────────────
        Model: 0 of 11 arrays changed; 2 other leaves changed
         ...
          .bn.inference     not an array                             False → True
          .drop.inference   not an array                             False → True
        ```
    """
    old, p = plan(before)
    new, q = plan(after)
    if p.treedef != q.treedef:
        found = first_mismatch(before, after)
        raise ValueError(_MSG_STRUCTURE.format(where=found or f"({p.treedef} != {q.treedef})"))
    rows, arrays = [], 0
    for where, kind, a, b in zip(_wheres(after, q.paths), q.kinds, old, new):
        if a is b:
            arrays += is_array_or_abstract(b)
            continue
        if is_array_or_abstract(a) and is_array_or_abstract(b):
            arrays += 1
            row = _compare_arrays(where, kind, a, b)
        elif is_array_or_abstract(a) or is_array_or_abstract(b):
            arrays += is_array_or_abstract(b)
            row = _compare_mixed(where, kind if is_array_or_abstract(b) else None, a, b)
        else:
            row = _compare_values(where, a, b)
        if row is not None:
            rows.append(row)
    return Diff(type(after).__name__, rows, arrays)


def _compare_arrays(where: str, kind: type[Kind], a: Any, b: Any) -> DiffRow | None:
    for x in (a, b):
        if isinstance(x, Tracer):
            raise TypeError(_MSG_NOT_CONCRETE.format(path=where, what="traced"))
        if isinstance(x, jax.ShapeDtypeStruct):
            raise TypeError(_MSG_NOT_CONCRETE.format(path=where, what="a jax.ShapeDtypeStruct"))
    if a.shape != b.shape or a.dtype != b.dtype:
        shape = str(b.shape) if a.shape == b.shape else f"{a.shape} → {b.shape}"
        dtype = str(b.dtype) if a.dtype == b.dtype else f"{a.dtype} → {b.dtype}"
        return DiffRow(where, kind, shape, dtype, None, None, None, "shape/dtype changed")
    size = math.prod(b.shape)
    if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
        x, y = np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b))
        differ = (x != y).reshape(*b.shape, -1).any(axis=-1)
        n = int(np.sum(differ))
        change = "key changed" if size == 1 else "keys changed"
        return (
            None
            if n == 0
            else DiffRow(where, kind, str(b.shape), str(b.dtype), n, size, None, change)
        )
    x, y = np.asarray(a), np.asarray(b)
    if np.issubdtype(x.dtype, np.bool_):
        differ = x != y
        max_abs = None
    elif np.issubdtype(x.dtype, np.integer):
        differ = x != y
        # widened, so no wrap-around (int8 -100 -> 100 is 200); 64-bit ones as Python ints
        if x.dtype.itemsize < 8:
            wide = np.abs(x[differ].astype(np.int64) - y[differ].astype(np.int64))
            max_abs = int(np.max(wide, initial=0))
        else:
            max_abs = max((abs(int(p) - int(q)) for p, q in zip(x[differ], y[differ])), default=0)
    else:  # floating (NumPy's and ml_dtypes') and complex
        x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
        y = y.astype(x.dtype)
        both_nan = np.isnan(x) & np.isnan(y)
        differ = (x != y) & ~both_nan
        max_abs = float(np.max(np.abs(x[differ] - y[differ]), initial=0.0))  # inf - inf unseen
    n = int(np.sum(differ))
    if n == 0:
        return None
    change = "" if max_abs is None else f"{max_abs:.3g}"
    return DiffRow(where, kind, str(b.shape), str(b.dtype), n, size, max_abs, change)


def _compare_mixed(where: str, kind: type[Kind] | None, a: Any, b: Any) -> DiffRow | None:
    """An array on one side and a Python value on the other (a flag jit returned as a
    `bool[]` array): changed where the values differ."""
    try:
        if np.array_equal(np.asarray(a), np.asarray(b)):
            return None
    except Exception:
        pass
    shape, dtype = (str(b.shape), str(b.dtype)) if kind is not None else ("", "")
    return DiffRow(where, kind, shape, dtype, None, None, None, f"{_short(a)} → {_short(b)}")


def _compare_values(where: str, a: Any, b: Any) -> DiffRow | None:
    try:
        if type(a) is type(b) and bool(a == b):
            return None
    except Exception:
        pass
    return DiffRow(where, None, "", "", None, None, None, f"{_short(a)} → {_short(b)}")


def _where(path: tuple) -> str:
    return jtu.keystr(path) or "(root)"


def _wheres(tree: Any, paths: tuple) -> list[str]:
    """Each leaf's path for a reader: an optimizer's flat `opt_leaves[i]` by its place
    in optax's state (`.opt_state[0].mu.weight`)."""
    from ._optimizer import optimizers_in

    out = [_where(path) for path in paths]
    for offset, opt in optimizers_in(tree):
        indices = opt.opt_def.unflatten(list(range(len(opt.opt_leaves))))
        for k, i in jtu.tree_flatten_with_path(indices)[0]:
            suffix = f".opt_leaves[{i}]"
            at = offset + i
            if out[at].endswith(suffix):
                out[at] = out[at][: -len(suffix)] + ".opt_state" + jtu.keystr(k)
    return out


def _short(x: Any, limit: int = 40) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _bytes(n: int) -> str:
    """Decimal units, as Flax NNX and `du --si`: 349.5 KB."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "KB"
    for bigger in ("MB", "GB", "TB"):
        if round(value, 1) < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def _sizes(t: SummaryRow | Total) -> tuple[str, str]:
    return f"{t.size:,}", _bytes(t.nbytes)


def _headline(kind: type[Kind], t: Total) -> str:
    return f"{kind.__name__} {t.size:,} ({_bytes(t.nbytes)})"


def _kind(kind: type[Kind]) -> Any:
    from rich.text import Text

    colour = next((c for k, c in _COLOURS.items() if issubclass(kind, k)), "default")
    return Text(kind.__name__, style=colour)


def _table(columns: Iterable[str]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.HORIZONTALS, header_style="bold")
    for c in columns:
        table.add_column(c, justify="right" if c in ("elements", "bytes", "changed") else "left")
    return table


def _group(title: str, table: Any, notes: list[str]) -> Any:
    """The title line, the table (if any) and notes under it."""
    from rich.console import Group
    from rich.text import Text

    parts = [Text(title, style="bold"), *([table] if table is not None else [])]
    return Group(*parts, *(Text(n, style="dim") for n in notes))


def _render(obj: Summary | Diff, *, html: bool) -> str:
    from rich.console import Console

    console = Console(
        file=io.StringIO(),
        record=True,
        width=10_000,  # tables take the width they need: never wrap a path
        color_system="truecolor" if html else None,
        force_terminal=html,
        force_jupyter=False,
        legacy_windows=False,
    )
    console.print(obj)
    if html:
        return console.export_html(inline_styles=True, code_format=_HTML)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()).strip("\n")
