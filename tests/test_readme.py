"""The README's usage example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
