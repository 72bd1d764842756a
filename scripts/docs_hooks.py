"""mkdocs hooks of the documentation site (``hooks:`` in mkdocs.yml): generated pages, links.

Generated at every build, so they cannot go stale:

- ``index.md``: the README (the project's story), its links rewritten for the site;
- ``examples.md``: one section per script in ``examples/``: its docstring and its source;
- ``reference/<module>.md``: one page per public module (see ``check_docs.public_modules``): the
  module's docstring and every name of its ``__all__`` documented where it is defined; a name
  re-exported from another public module links there. A new public module, or a new name in an
  ``__all__``, appears without any change here.

Links from a page to a file outside ``docs/`` are rewritten: an example script to its section of
the examples page, any other file of the repository to its name as plain text (the site does not
serve source files). A link to a file that does not exist is left alone for mkdocs to report.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"


def _check_docs() -> ModuleType:
    """scripts/check_docs.py, which owns the rule for what a public module is."""
    spec = importlib.util.spec_from_file_location(
        "varlin_check_docs", ROOT / "scripts" / "check_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _check_docs()


# -- API reference ------------------------------------------------------------------------------
def reference_page(name: str, package: griffe.Module, public: set[str]) -> str:
    """The markdown of the reference page of module ``name`` (read statically, not imported)."""
    module = package if name == package.path else package[name.split(".", 1)[1]]
    here: list[str] = []
    elsewhere: list[tuple[str, str]] = []
    for item in module.exports or []:
        member = module.members.get(item)
        target = member.target_path if member is not None and member.is_alias else None
        home = target.rsplit(".", 1)[0] if target else None
        if target in public:
            elsewhere.append((item, target))  # a public module
        elif target and home in public and home != name and _exported(package, home, item):
            elsewhere.append((item, target))  # documented on its own module's page
        else:
            here.append(item)
    members = ", ".join(repr(m) for m in here)
    text = f"::: {name}\n    options:\n      members: [{members}]\n"
    if elsewhere:
        links = "\n".join(f"- [`{item}`][{target}]" for item, target in elsewhere)
        text += f"\n**Also exported by `{name}`**, documented where they are defined:\n\n{links}\n"
    return text


def _exported(package: griffe.Module, module: str, item: str) -> bool:
    found = package if module == package.path else package[module.split(".", 1)[1]]
    return item in (found.exports or [])


# -- examples -----------------------------------------------------------------------------------
def examples_page() -> str:
    parts = [
        "# Examples\n",
        "Runnable scripts in the repository's `examples/` folder; each runs in the test suite on "
        "tiny sizes (`tests/test_examples.py`). Run one with `python examples/NAME.py --help`.\n",
    ]
    for path in sorted(EXAMPLES.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source)) or ""
        title, _, body = doc.partition("\n")
        parts.append(f"## {title.rstrip('.') or path.stem} {{#{path.stem}}}\n")
        body = re.sub(r"\[(?=-)", r"\\[", body.strip())  # "[--option]" is usage, not a link
        parts.append(f"`examples/{path.name}`\n\n{body}\n")
        parts.append(f"````python\n{source.rstrip()}\n````\n")
    return "\n".join(parts)


# -- links --------------------------------------------------------------------------------------
_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")


def rewrite_links(markdown: str, source_dir: Path, page_dir: Path) -> str:
    """Rewrite links of a page whose source is in ``source_dir`` and whose site path is in
    ``page_dir`` (a folder under docs/)."""

    def fix(match: re.Match[str]) -> str:
        text, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):
            return match.group(0)  # a URL or an anchor on the same page
        path_part, hash_, anchor = target.partition("#")
        resolved = (source_dir / path_part).resolve()
        if resolved == DOCS or DOCS in resolved.parents:
            rel = os.path.relpath(resolved, page_dir)
            return f"[{text}]({Path(rel).as_posix()}{hash_}{anchor})"
        examples_page_path = Path(os.path.relpath(DOCS / "examples.md", page_dir)).as_posix()
        if resolved == EXAMPLES:
            return f"[{text}]({examples_page_path})"
        if resolved.parent == EXAMPLES and resolved.suffix == ".py" and resolved.is_file():
            return f"[{text}]({examples_page_path}#{resolved.stem})"
        if resolved.exists() and ROOT in resolved.parents:
            return text
        return match.group(0)

    return _LINK.sub(fix, markdown)


# -- hooks --------------------------------------------------------------------------------------
def _nav_paths(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_paths(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_nav_paths(v) for v in nav))
    return set()


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    """Complete the nav: pages of docs/ that mkdocs.yml does not list yet (under "More", so a
    new page is reachable without a config change), then the API reference."""
    nav = config.nav or []
    listed = _nav_paths(nav)
    unlisted = sorted(
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if p.relative_to(DOCS).as_posix() not in listed
    )
    if unlisted:
        nav.append({"More": unlisted})
    modules = CHECK.public_modules()
    nav.append({"API reference": [{m: f"reference/{m}.md"} for m in modules]})
    config.nav = nav
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    modules = CHECK.public_modules()
    public = set(modules)
    package = griffe.load("varlin", search_paths=[str(ROOT / "src")], resolve_aliases=False)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=readme))
    files.append(File.generated(config, "examples.md", content=examples_page()))
    for name in modules:
        content = reference_page(name, package, public)
        files.append(File.generated(config, f"reference/{name}.md", content=content))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, **kwargs: Any) -> str:
    uri = page.file.src_uri
    page_dir = (DOCS / uri).parent
    source_dir = ROOT if uri == "index.md" else page_dir
    return rewrite_links(markdown, source_dir, page_dir)
