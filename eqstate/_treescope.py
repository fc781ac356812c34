"""treescope rendering of modules with each field's kind: `running_mean: BatchStat = <...>`.

treescope is optional: where it is installed, a handler for `eqx.Module` is added to
its global registry when eqstate is imported. It renders eqstate modules, Equinox
modules inside them and any module whose class declares kinds; other Equinox modules
(a plain Equinox model) fall through to treescope's own dataclass rendering. Arrays are
rendered by treescope as usual. The text `repr` (Equinox's) is not touched.
"""

import contextvars
import dataclasses
import importlib.util
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._convert import is_array_or_abstract
from ._kinds import Kind, Param, field_kind
from ._module import Module


# the kind a module's undeclared fields take: that of the field holding the module;
# `None` outside an eqstate rendering
_INHERITED: contextvars.ContextVar[type[Kind] | None] = contextvars.ContextVar(
    "eqstate_treescope_kind", default=None
)
_KIND_STYLE = "color: #7a5ea8; font-style: italic"


def _shows_kind(f: dataclasses.Field, value: Any) -> bool:
    """Whether the field's line names its kind: it holds arrays, and declares a kind or
    holds no modules (a module's own fields name theirs)."""
    if not any(map(is_array_or_abstract, jtu.tree_leaves(value))):
        return False  # flags, None: kinds are for arrays
    if field_kind(f) is not None:
        return True
    return not any(
        isinstance(x, eqx.Module)
        for x in jtu.tree_leaves(value, is_leaf=lambda x: isinstance(x, eqx.Module))
    )


def render_module(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """treescope handler: a module as its constructor, each field with its kind."""
    from treescope import rendering_parts as rp

    inherited = _INHERITED.get()
    fields = dataclasses.fields(node)
    declares = any(field_kind(f) is not None for f in fields)
    if inherited is None and not isinstance(node, Module) and not declares:
        return NotImplemented  # a plain Equinox module: treescope's own rendering
    outer = inherited or Param
    shown = [f for f in fields if f.repr]
    children = []
    for i, f in enumerate(shown):
        child_path = None if path is None else f"{path}.{f.name}"
        if i < len(shown) - 1:
            comma = rp.siblings(",", rp.fold_condition(collapsed=rp.text(" ")))
        else:
            comma = rp.fold_condition(expanded=rp.text(","))
        try:
            value = getattr(node, f.name)
        except AttributeError:
            missing = rp.comment_color(rp.text(f"# {f.name} is missing"))
            children.append(rp.fold_condition(expanded=missing))
            continue
        static = f.metadata.get("static", False)
        kind = outer if static else field_kind(f) or outer
        name: Any = rp.text(f.name + "=")
        if not static and _shows_kind(f, value):
            label = rp.custom_style(rp.text(f": {kind.__name__}"), _KIND_STYLE)
            name = rp.siblings(
                f.name,
                rp.roundtrip_condition(
                    roundtrip=rp.text("="), not_roundtrip=rp.siblings(label, " = ")
                ),
            )
        token = _INHERITED.set(kind)
        try:
            rendered = subtree_renderer(value, path=child_path)
        finally:
            _INHERITED.reset(token)
        children.append(
            rp.build_full_line_with_annotations(rp.siblings_with_annotations(name, rendered), comma)
        )
    return rp.build_foldable_tree_node_from_children(
        prefix=rp.render_dataclass_constructor(node),
        children=children,
        suffix=")",
        path=path,
        child_type_single_and_plural=("field", "fields"),
    )


def register() -> bool:
    """Add the handler to treescope's registry, if treescope is installed."""
    if importlib.util.find_spec("treescope") is None:
        return False
    try:
        from treescope import type_registries

        type_registries.TREESCOPE_HANDLER_REGISTRY.setdefault(eqx.Module, render_module)
    except Exception:  # a treescope that does not import, or of another API: eqstate works
        return False
    return True
