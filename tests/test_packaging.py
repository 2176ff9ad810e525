"""What a non-editable install ships: every package of the source tree."""

import pathlib
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_the_wheel():
    import pytest

    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "chaperone").rglob("__init__.py")}
    assert found | {"chaperone._remote"} == listed
    assert (REPO / "chaperone" / "py.typed").exists()
