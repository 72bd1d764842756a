"""Griffe extension for the documentation site: varlin's docstrings use a few reStructuredText
constructs (as torch's do) inside Google-style sections; this turns them into markdown that
mkdocstrings renders, before the docstrings are parsed.

- ``:math:`x``` becomes inline math ``$x$``, and a ``.. math::`` block a ``$$ ... $$`` block
  (rendered by pymdownx.arithmatex and MathJax);
- ``:class:`Name```, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:`` and
  ``:obj:`` become cross-references when ``Name`` is a varlin object, looked up as Python would
  from where the docstring is (its class, its module), through imports; a ``~`` shows the last
  part only, ``title <target>`` a title. Names from other libraries (torch, numpy, ...) become
  code. A varlin-looking name that cannot be found stays a cross-reference, so the strict build
  reports it.

Loaded by mkdocs.yml as ``scripts/griffe_rst.py:RstToMarkdown``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(math|class|func|meth|attr|data|mod|exc|obj):`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, first = match.groups()
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min((_indent(line) for line in body if line.strip()), default=0)
        if out and out[-1].strip():
            out.append("")
        # Markdown needs "$$" at the margin, or at 4 spaces inside a list item: an RST list
        # item's 2-space continuation is neither.
        indent = " " * 4 if 0 < len(indent) < 4 else indent
        out.append(f"{indent}$$")
        out.extend(f"{indent}{line[depth:]}" if line.strip() else "" for line in body)
        out.append(f"{indent}$$")
        out.append("")
    return "\n".join(out)


_GROUPED = re.compile(r"^(\s+)(\w+(?:, \w+)+): (.*)$")


def _split_grouped_items(text: str) -> str:
    """``a, b: description`` (torch's way to document parameters together) becomes one item per
    name, each with the whole description, so each parameter is matched to the signature."""
    lines = _join_wrapped_names(text.splitlines())
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _GROUPED.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        block = [first]
        i += 1
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(indent):
            block.append(lines[i])
            i += 1
        for name in names.split(", "):
            out.append(f"{indent}{name}: {block[0]}")
            out.extend(block[1:])
    return "\n".join(out)


_NAMES_WRAPPED = re.compile(r"^(\s+)(\w+(?:, \w+)*,)\s*$")


def _join_wrapped_names(lines: list[str]) -> list[str]:
    """Join a list of names wrapped over lines (``a, b,`` then, indented, ``c: ...``)."""
    out: list[str] = []
    for line in lines:
        previous = _NAMES_WRAPPED.match(out[-1]) if out else None
        if previous and line.strip() and _indent(line) > len(previous.group(1)):
            out[-1] = f"{out[-1].rstrip()} {line.strip()}"
        else:
            out.append(line)
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self.collection = loader.modules_collection
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self.convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member)  # type: ignore[arg-type]

    def convert(self, text: str, obj: griffe.Object) -> str:
        text = _split_grouped_items(_math_blocks(text))

        def role(match: re.Match[str]) -> str:
            kind, content = match.groups()
            if kind == "math":
                return f"${content.strip()}$"
            title, target = None, content.strip()
            titled = re.match(r"^(.*?)\s*<([^>]+)>$", target)
            if titled:
                title, target = titled.groups()
            short = target.startswith("~")
            target = target.lstrip("~.")
            shown = title or (target.rsplit(".", 1)[-1] if short else target)
            if kind in ("func", "meth"):
                shown = shown if shown.endswith(")") or title else f"{shown}()"
            found = self.resolve(target, obj)
            if found is None:
                return f"`{shown}`"  # another library's object: code, not a link
            return f"[`{shown}`][{found}]"

        return _ROLE.sub(role, text)

    def resolve(self, name: str, obj: griffe.Object) -> str | None:
        """The path of the varlin object ``name`` as seen from ``obj`` (as Python scoping sees
        it: the enclosing classes, then the module's globals, imports included; a dotted name
        starting with ``varlin`` from the package). ``None`` for another library's object or a
        varlin object the reference does not document (shown as code); ``name`` itself when
        nothing is found, a broken reference."""
        parts = name.split(".")
        current: Any = None
        if parts[0] == "varlin":
            current = self.collection["varlin"]
        else:
            scope: Any = obj
            while scope is not None and current is None:
                if parts[0] in scope.members:
                    current = scope.members[parts[0]]
                scope = None if scope.is_module else scope.parent
            if current is None:
                return None if len(parts) > 1 else name  # a dotted name of another library
        for part in parts[1:] + [None]:  # None: resolve the last alias too
            if current.is_alias:
                target = current.target_path
                if not target.startswith("varlin"):
                    return None
                try:
                    current = self.collection[target]
                except KeyError:
                    return name
            if part is not None:
                if part not in current.members:
                    return name
                current = current.members[part]
        return str(current.path) if _documented(current) else None


def _documented(obj: Any) -> bool:
    """Whether the API reference renders ``obj``: a public module; a name in its module's
    ``__all__``; a public member of a documented class."""
    if obj.is_module:
        return not any(part.startswith("_") for part in obj.path.split("."))
    parent = obj.parent
    if parent.is_module:
        return _documented(parent) and obj.name in (parent.exports or [])
    return not obj.name.startswith("_") and _documented(parent)
