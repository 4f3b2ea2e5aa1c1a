"""Every list of supported model families comes from the one registry (promptkd.hf.families): the modules that
need one read it, the errors and the help texts print it, and every paragraph of the documentation (README,
DESIGN.md, docs/, the package's docstrings and strings) that names five or more families names exactly the
registry's, in its order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import transformers

from promptkd.cli import build_parser
from promptkd.errors import InputError
from promptkd.hf import attention, layer_drop
from promptkd.hf.families import FAMILIES, MODEL_TYPES, family_names

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f.name for f in FAMILIES.values()]
# A family named in prose: its name, or the short forms "Qwen2/3" and "Gemma 2/3" (two families each), with an
# optional remark in parentheses ("Gemma 3 (text)"). A list: such names joined by ",", "/" or "and".
SHORT = {"Qwen2/3": ("Qwen2", "Qwen3"), "Gemma 2/3": ("Gemma 2", "Gemma 3")}
NAME = "|".join(re.escape(n) for n in sorted([*SHORT, *NAMES], key=len, reverse=True))
ITEM = rf"(?:{NAME})(?![\w-])(?:\s*\([^()]*\))?"
LIST = re.compile(rf"{ITEM}(?:(?:\s*,\s*(?:and\s+)?|\s*/\s*|\s+and\s+){ITEM})+")


def _lists(text: str) -> list[list[str]]:
    """Each list of families in ``text``, as the families it names (short forms expanded)."""
    out = []
    for m in LIST.finditer(text):
        names = []
        for item in re.finditer(NAME, re.sub(r"\([^()]*\)", "", m.group(0))):
            names += SHORT.get(item.group(0), (item.group(0),))
        out.append(names)
    return out


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]


def _python_strings(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _documents():
    pages = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for paragraph in _paragraphs(page.read_text()):
            yield str(page.relative_to(ROOT)), paragraph
    for module in sorted((ROOT / "promptkd").rglob("*.py")):
        for string in _python_strings(module):
            for paragraph in _paragraphs(string):
                yield str(module.relative_to(ROOT)), paragraph
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        yield f"promptkd {name} --help", " ".join(sub.format_help().split())


def test_family_lists_in_documents_are_the_registrys():
    """A list of four or more families is a list of what promptkd supports: it must be the registry's, whole and
    in order (a shorter one is a remark about some families, and names fewer)."""
    found = 0
    for where, paragraph in _documents():
        for names in _lists(paragraph):
            if len(names) >= 4:
                found += 1
                assert names == NAMES, f"{where}: lists {', '.join(names)}, the registry has {family_names()}"
    assert found >= 5  # README, the prompted teacher's docs and docstring, init-student's help, layer dropping


def test_the_list_finder_sees_lists():
    assert _lists("families: GPT-2, Llama (GQA), Mistral and OPT; also Gemma 2/3") == [
        ["GPT-2", "Llama", "Mistral", "OPT"]]
    assert _lists("a GPT-2 / Llama / Qwen2/3 model, and Gemma 3 (text)") == [["GPT-2", "Llama", "Qwen2", "Qwen3"]]
    assert _lists("Llama-family teachers (SmolLM2, LLaMA, Mistral, Qwen2)") == [["Mistral", "Qwen2"]]


def test_the_modules_read_the_registry():
    assert attention.SUPPORTED_MODEL_TYPES == MODEL_TYPES
    assert layer_drop.LAYER_LISTS == {t: f.layers for t, f in FAMILIES.items()}
    for module in sorted((ROOT / "promptkd").rglob("*.py")):  # no second list of model types anywhere
        if module.name == "families.py":
            continue
        for string in _python_strings(module):
            assert string not in MODEL_TYPES, f"{module}: model type {string!r} spelled out (use the registry)"


def test_errors_and_help_name_the_registrys_families(tmp_path):
    expected = re.escape(family_names())
    with pytest.raises(ValueError, match=f"prefix attention does not support 'gpt_neox' models.*{expected}"):
        attention.check_supported(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=50)))
    with pytest.raises(InputError, match=f"layer dropping does not support 'gpt_neox' models.*{expected}"):
        layer_drop.check_family(transformers.GPTNeoXConfig())
    parser = build_parser()
    help_text = " ".join(parser._subparsers._group_actions[0].choices["init-student"].format_help().split())
    assert family_names() in help_text
