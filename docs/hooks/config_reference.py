"""mkdocs hook: replaces `<!-- config-reference -->` in a page with a table of every config key,
generated from the dataclasses in `retinanet.config` and `retinanet.model.config` (type and
allowed values from the annotations, default from the field, description from the field's
trailing comment), so that the reference cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

MARKER = "<!-- config-reference -->"


def _describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        ranges = [e.describe() for e in extras if hasattr(e, "describe")]
        return _describe(base) + (f", {' '.join(ranges)}" if ranges else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return f"list of {_describe(item)}"
    return getattr(annotation, "__name__", str(annotation))


def _comments(cls) -> dict[str, str]:
    """The trailing `# ...` comment of each field, and comment lines right above a field."""
    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+)\s*:.*?(?:#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "class ", "@")):
            text = " ".join(pending + ([match.group(2)] if match.group(2) else []))
            comments[match.group(1)] = text
        pending = []
    return comments


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, float):
        value = round(value, 6)
    if isinstance(value, list):
        value = [[round(v, 2) for v in x] if isinstance(x, list) else x for x in value]
    return f"`{value!r}`" if value != "" else '`""`'


def _rows(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _comments(cls)
    rows = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(annotation):
            rows += _rows(annotation, key + ".")
            continue
        text = comments.get(field.name, "").replace("|", "\\|")
        allowed = _describe(annotation).replace("|", "\\|")
        rows.append(f"| `{key}` | {allowed} | {_default(field)} | {text} |")
    return rows


def reference() -> str:
    from retinanet.config import Config

    header = ["| key | allowed values | default | meaning |", "|---|---|---|---|"]
    lines = []
    hints = typing.get_type_hints(Config, include_extras=True)
    for field in dataclasses.fields(Config):
        section = hints[field.name]
        if dataclasses.is_dataclass(section):
            lines += [f"### `{field.name}`", "", *header, *_rows(section, field.name + "."), ""]
    top = [row for row in _rows(Config, "") if row.split("`")[1].count(".") == 0]
    lines += ["### top level", "", *header, *top, ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference())
    return markdown
