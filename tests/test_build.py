"""The build's settings (setup.py), read from the file without building anything."""
import ast
import pathlib

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"


def setup_tree():
    return ast.parse(SETUP.read_text(), str(SETUP))


def from_setup_py(name):
    """Function ``name`` of setup.py, compiled on its own: setup.py itself is not
    run (it would build), and needs neither Cython nor setuptools to be read."""
    tree = setup_tree()
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(found) == 1, f"setup.py defines {name}() {len(found)} times"
    namespace = {}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("debug", [False, True])
def test_debug_adds_checks_only(debug):
    directives = from_setup_py("cython_directives")(debug=debug)
    assert directives["boundscheck"] is debug and directives["initializedcheck"] is debug
    # indexing and division are the same in both builds
    assert directives["wraparound"] is False
    assert directives["cdivision"] is True


def test_debug_and_release_differ_only_in_the_checks():
    cython_directives = from_setup_py("cython_directives")
    debug, release = cython_directives(debug=True), cython_directives(debug=False)
    assert debug.keys() == release.keys()
    assert {k for k in debug if debug[k] != release[k]} == {"boundscheck", "initializedcheck"}


def test_setup_cythonizes_with_those_directives():
    """The directives setup.py passes to cythonize() are cython_directives(DEBUG)."""
    tree = setup_tree()
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cythonize"]
    assert len(calls) == 1
    given = {kw.arg: kw.value for kw in calls[0].keywords}["compiler_directives"]
    assert isinstance(given, ast.Name)
    assigned = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == [given.id]]
    assert [ast.dump(value) for value in assigned] == [
        ast.dump(ast.parse("cython_directives(DEBUG)", mode="eval").body)]


def test_every_subpackage_is_packaged():
    """A wheel carries exactly the packages pyproject lists: each directory of
    kvcache/ holding an __init__.py must be one (a missing one imports in the
    source tree and fails only once installed)."""
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "kvcache").rglob("__init__.py")}
    assert found == listed
