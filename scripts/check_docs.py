"""Check that the built documentation site renders every public name of varlin.

Every public module (a file under ``src/varlin`` whose dotted path has no part starting with
``_``, packages included) must define ``__all__``, and every name in it must be in the site's
inventory (``site/objects.inv``, written by mkdocstrings): either as ``module.name`` or, for a
name re-exported from another module, at the place it is documented (``obj.__module__`` and
``obj.__qualname__``; a module at its own name). ``make docs`` runs it after ``mkdocs build
--strict``.

Usage:  python scripts/check_docs.py [SITE_DIR]     (exit status 1 and a list when names miss)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "varlin"


def public_modules(package: Path = PACKAGE) -> list[str]:
    """Dotted names of varlin's public modules and packages, the package itself first."""
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names, key=lambda n: (n != "varlin", n))


def documented_at(obj: Any) -> str | None:
    """Where a re-exported object is documented: its defining module and qualified name."""
    if isinstance(obj, ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None


def inventory(site: Path) -> set[str]:
    from mkdocstrings import Inventory

    with (site / "objects.inv").open("rb") as fh:
        return set(Inventory.parse_sphinx(fh))


def missing_names(site: Path) -> list[str]:
    """``module.name`` of every public name the site does not render (empty when all are)."""
    rendered = inventory(site)
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            missing.append(f"{name} (no __all__)")
            continue
        if name not in rendered:
            missing.append(f"{name} (the module itself)")
        for item in exported:
            home = documented_at(getattr(module, item, None))
            if f"{name}.{item}" not in rendered and home not in rendered:
                missing.append(f"{name}.{item}")
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    site = Path(args[0]) if args else ROOT / "site"
    if not (site / "objects.inv").is_file():
        print(f"check_docs: error: {site / 'objects.inv'} not found; build the site first")
        return 1
    missing = missing_names(site)
    if missing:
        print(f"check_docs: {len(missing)} public names are missing from the API reference:")
        for item in missing:
            print(f"  {item}")
        return 1
    print(f"check_docs: every public name of {len(public_modules())} modules is in the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
