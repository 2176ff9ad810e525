"""What a non-editable install ships: every package of the source tree."""

import pathlib
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_package_is_listed_for_the_wheel():
    import pytest

    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "chaperone").rglob("__init__.py")}
    assert found | {"chaperone._remote"} == listed
    assert (REPO / "chaperone" / "py.typed").exists()


def test_the_command_is_a_script_that_loads_only_chaperone():
    """``chaperone`` is bin/chaperone, not an entry point: the launcher pip
    writes for an entry point imports re first (~8 ms of every command).
    The script imports chaperone.__main__ and nothing else."""
    import ast
    import subprocess

    import pytest

    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "chaperone" not in project["project"].get("scripts", {})
    assert project["tool"]["setuptools"]["script-files"] == ["bin/chaperone"]
    script = (REPO / "bin" / "chaperone").read_text()
    assert script.startswith("#!python\n")  # (pip writes the interpreter's path there)
    imported = [n for node in ast.walk(ast.parse(script)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])]
    assert imported == ["chaperone.__main__"]
    res = subprocess.run([sys.executable, str(REPO / "bin" / "chaperone"), "--version"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("chaperone "), res.stderr


def test_every_exception_is_defined_in_errors_py():
    """One module holds every exception chaperone raises (issue 11): a class
    deriving from an exception anywhere else in the package is a defect,
    except private control-flow ones (a leading underscore)."""
    import ast

    root = pathlib.Path(__file__).resolve().parents[2] / "chaperone"
    defined = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                defined.setdefault(node.name, []).append((path.relative_to(root).as_posix(), node))
    exceptions = {"Exception", "BaseException", "ValueError"}
    changed = True
    while changed:  # classes deriving from exceptions, transitively
        changed = False
        for name, places in defined.items():
            if name not in exceptions and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)) in exceptions
                    for _, node in places for b in node.bases):
                exceptions.add(name)
                changed = True
    elsewhere = sorted("%s in %s" % (name, where) for name, places in defined.items() if name in exceptions
                       and not name.startswith("_") for where, _ in places if where != "errors.py")
    assert not elsewhere, elsewhere
    import chaperone.errors as errors
    from chaperone.fleet.nodeset import NodeSetError
    from chaperone.push.endpoint import Reject
    from chaperone.serve.client import ServeError
    assert (NodeSetError, Reject, ServeError) == (errors.NodeSetError, errors.Reject, errors.ServeError)


#: Functions of remote/agent.py allowed over MAX_FUNCTION_LINES for now (none).
LONG_AGENT_FUNCTIONS = set()
MAX_FUNCTION_LINES = 60


def test_no_function_of_the_agent_is_over_60_lines():
    """The agent reads as short functions (issue 11, "no function over ~60
    lines"): each, nested ones too, from its ``def`` to its last line; the
    allow-list holds only functions that are still long."""
    import ast

    source = (REPO / "remote" / "agent.py").read_text()
    sizes = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sizes.setdefault(node.name, []).append((node.lineno, node.end_lineno - node.lineno + 1))
    long = sorted("%s (line %d): %d lines" % (name, line, size) for name, places in sizes.items()
                  for line, size in places if size > MAX_FUNCTION_LINES and name not in LONG_AGENT_FUNCTIONS)
    assert not long, long
    stale = sorted(name for name in LONG_AGENT_FUNCTIONS
                   if all(size <= MAX_FUNCTION_LINES for _, size in sizes.get(name, [(0, 0)])))
    assert not stale, "short now (or gone): take them off LONG_AGENT_FUNCTIONS: %s" % stale


def test_the_public_names_are_exported_for_strict_type_checkers():
    """``mypy --strict`` takes ``from chaperone import Chaperone`` only if
    the package re-exports it explicitly: an ``import X as X`` under
    TYPE_CHECKING and a literal ``__all__`` (before: "Module 'chaperone'
    does not explicitly export attribute 'Chaperone'", for every name the
    README imports).  Read from the source, as a type checker does."""
    import ast

    import chaperone

    tree = ast.parse(open(chaperone.__file__).read())
    literal = [n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert literal and isinstance(literal[0].value, ast.List), "__all__ must be a literal list"
    listed = {ast.literal_eval(e) for e in literal[0].value.elts}
    assert listed == set(chaperone._LAZY) | {"__version__"}
    block = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"][0]
    reexported = {a.name for imp in block.body if isinstance(imp, ast.ImportFrom) for a in imp.names
                  if a.asname == a.name}
    assert reexported == set(chaperone._LAZY)
