"""The documentation: every Python example in the README and in the site's pages (``docs/``) runs as written,
the README's links reach files that exist, the README stays short, and the site builds with
``mkdocs build --strict`` (a broken link, anchor or API reference fails it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLES = [(page, i, code) for page in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def test_readme_and_pages_have_examples():
    assert sum(page.name == "README.md" for page, _, _ in EXAMPLES) >= 5
    assert {page.name for page, _, _ in EXAMPLES} >= {"README.md", "index.md", "offline.md", "prefix-attention.md",
                                                        "training.md", "trl.md"}


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{p.relative_to(ROOT)}-{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    """An example whose first line is ``# requires: PACKAGE`` (an optional extra) is skipped without it."""
    first = code.splitlines()[0]
    if first.startswith("# requires: "):
        pytest.importorskip(first.removeprefix("# requires: ").strip())
    exec(compile(code, f"{page.relative_to(ROOT)} example {index}", "exec"), {})


def test_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link


def test_site_builds_strict(tmp_path):
    """mkdocs-material and mkdocstrings are in the test extra; the build fails on any warning."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("fused_linear_kd_loss") > 3
