"""The documentation tooling: what counts as public, the reference check, the docstring and link
rewriting. ``make docs`` (part of ``make test``) builds the real site strictly; these tests pin
the pieces on small inputs so a regression shows which piece broke.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"varlin_docs_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_docs = _load("check_docs")


def test_public_modules_are_the_files_without_a_private_part(tmp_path: Path) -> None:
    pkg = tmp_path / "varlin"
    for rel in ["__init__.py", "__main__.py", "_io.py", "layers.py", "cli/__init__.py",
                "cli/fit.py", "cli/_shared.py", "_private/x.py"]:  # fmt: skip
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    assert check_docs.public_modules(pkg) == [
        "varlin",
        "varlin.cli",
        "varlin.cli.fit",
        "varlin.layers",
    ]
    real = check_docs.public_modules()
    assert real[0] == "varlin" and {"varlin.layers", "varlin.sklearn"} <= set(real)
    assert not [m for m in real if "._" in m]


def test_check_reports_every_name_missing_from_the_inventory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import varlin
    import varlin.layers

    monkeypatch.setattr(check_docs, "public_modules", lambda: ["varlin", "varlin.layers"])
    everything = {"varlin", "varlin.layers", "varlin.__version__", "varlin.validation"}
    everything |= {f"varlin.layers.{n}" for n in varlin.layers.__all__}
    # re-exports count where they are documented; submodules at their own name
    everything |= {check_docs.documented_at(getattr(varlin, n)) for n in varlin.__all__}
    monkeypatch.setattr(check_docs, "inventory", lambda site: everything)
    assert check_docs.missing_names(Path("site")) == []
    monkeypatch.setattr(
        check_docs, "inventory", lambda site: everything - {"varlin.layers.VariationalLinear"}
    )
    # missing from its own module's page, and so for the re-export in varlin too
    assert check_docs.missing_names(Path("site")) == [
        "varlin.VariationalLinear",
        "varlin.layers.VariationalLinear",
    ]


def test_check_fails_without_a_built_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_docs.main([str(tmp_path)]) == 1
    assert "objects.inv not found" in capsys.readouterr().out


# -- docstrings: reStructuredText constructs to markdown ------------------------------------------


@pytest.fixture(scope="module")
def rst() -> tuple[ModuleType, object, object]:
    """The extension, loaded on the real package (static analysis: nothing is imported)."""
    griffe = pytest.importorskip("griffe")
    module = _load("griffe_rst")
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")])
    package = loader.load("varlin")
    extension = module.RstToMarkdown()
    extension.collection = loader.modules_collection
    return module, extension, package


def test_math_directive_becomes_a_display_block(rst: tuple[ModuleType, object, object]) -> None:
    module, _, _ = rst
    text = "Intro:\n\n.. math::\n    a = b\n    + c\n\nAfter."
    assert module._math_blocks(text) == "Intro:\n\n$$\na = b\n+ c\n$$\n\nAfter."
    # inside an RST list item (2-space continuation) it moves to markdown's 4 spaces
    listed = "- item:\n\n  .. math::\n      x\n"
    assert module._math_blocks(listed) == "- item:\n\n    $$\n    x\n    $$\n"


def test_grouped_parameters_are_split(rst: tuple[ModuleType, object, object]) -> None:
    module, _, _ = rst
    text = "Args:\n    device, dtype: factory keyword\n        arguments.\n    x: input."
    assert module._split_grouped_items(text) == (
        "Args:\n    device: factory keyword\n        arguments.\n"
        "    dtype: factory keyword\n        arguments.\n    x: input."
    )


def test_grouped_parameters_wrapped_over_lines_are_split(
    rst: tuple[ModuleType, object, object],
) -> None:
    module, _, _ = rst
    text = "Args:\n    a, b,\n        c: as for fit;\n        more.\n    d: x."
    assert module._split_grouped_items(text) == (
        "Args:\n    a: as for fit;\n        more.\n    b: as for fit;\n        more.\n"
        "    c: as for fit;\n        more.\n    d: x."
    )


def test_nav_paths_collects_every_page() -> None:
    pytest.importorskip("mkdocs")
    hooks = _load("docs_hooks")
    nav = [{"Home": "index.md"}, {"Results": [{"UCI": "results/uci.md"}, "extra.md"]}]
    assert hooks._nav_paths(nav) == {"index.md", "results/uci.md", "extra.md"}


def test_roles_become_links_code_or_math(rst: tuple[ModuleType, object, object]) -> None:
    _, extension, package = rst
    likelihoods = package["likelihoods"]
    convert = extension.convert  # type: ignore[attr-defined]
    # a varlin class, from its module's scope and by full path; ~ shows the last part
    assert convert(":class:`Gaussian`", likelihoods) == "[`Gaussian`][varlin.likelihoods.Gaussian]"
    assert convert(":class:`~varlin.layers.VariationalLinear`", likelihoods) == (
        "[`VariationalLinear`][varlin.layers.VariationalLinear]"
    )
    # through an import of the module, to where it is defined
    assert convert(":func:`inverse_softplus`", likelihoods) == (
        "[`inverse_softplus()`][varlin.functional.inverse_softplus]"
    )
    # another library's object: code, not a link
    assert convert(":class:`~torch.distributions.Normal`", likelihoods) == "`Normal`"
    assert convert(":class:`torch.nn.Linear`", likelihoods) == "`torch.nn.Linear`"
    # a varlin object the reference does not document (not in __all__): code
    assert convert(":func:`_shape_error`", likelihoods) == "`_shape_error()`"
    # a name that exists nowhere stays a cross-reference, for the strict build to report
    assert convert(":class:`Gausian`", likelihoods) == "[`Gausian`][Gausian]"
    assert convert(":math:`\\sigma^2`", likelihoods) == "$\\sigma^2$"


# -- links ----------------------------------------------------------------------------------------


def test_links_outside_docs_are_rewritten() -> None:
    pytest.importorskip("mkdocs")
    hooks = _load("docs_hooks")
    docs = ROOT / "docs"
    readme = (
        "[uci](docs/results/uci.md#x) [ex](examples/seed_usage.py) [all](examples) "
        "[web](https://x.org/a.md) [same](#here) [script](scripts/make_figures.py) "
        "[gone](docs/nothing.md) ![img](docs/figures/regression.png)"
    )
    assert hooks.rewrite_links(readme, ROOT, docs) == (
        "[uci](results/uci.md#x) [ex](examples.md#seed_usage) [all](examples.md) "
        "[web](https://x.org/a.md) [same](#here) script "
        "[gone](nothing.md) ![img](docs/figures/regression.png)"
    )
    page = "[figs](../../scripts/make_figures.py) [ex](../../examples/seed_usage.py)"
    assert hooks.rewrite_links(page, docs / "results", docs / "results") == (
        "figs [ex](../examples.md#seed_usage)"
    )
