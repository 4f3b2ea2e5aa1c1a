"""The ``promptkd`` command: the quick demo end to end, then eval and plot on its output; exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from promptkd.cli import main
from promptkd.demo import METHODS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert main(["demo", "--quick", "--out", out]) == 0
    return out


def test_quick_demo_writes_table_and_plots(demo):
    results = json.load(open(os.path.join(demo, "results.json")))
    assert list(results["scores"]) == ["teacher", "sft_init", "sft", *METHODS]
    for scores in results["scores"].values():
        for split in ("test", "test_heldout"):
            assert 0.0 <= scores[split]["rougeL"] <= 100.0
    table = open(os.path.join(demo, "results.md")).read()
    assert table.startswith("| model |") and "| promptkd |" in table
    for name in ("test_rougeL.png", "valid_rougeL.png", "train_loss.png"):
        with open(os.path.join(demo, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(demo, "promptkd", "final", "prompt", "adapter_model.safetensors"))


def test_eval_and_plot_commands(demo, tmp_path, capsys):
    model = os.path.join(demo, "sft", "final", "model")
    data = os.path.join(demo, "data", "test.jsonl")
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", model, "--data", data, "--seeds", "1", "2", "--limit", "5",
                 "--max-new-tokens", "6", "--out", out]) == 0
    scores = json.load(open(os.path.join(out, "scores.json")))
    assert scores["test"]["num_examples"] == 5 and len(scores["test"]["per_seed"]) == 2
    assert len(open(os.path.join(out, "test.generations.jsonl")).readlines()) == 5
    assert "ROUGE-L" in capsys.readouterr().out
    assert main(["plot", os.path.join(demo, "promptkd")]) == 0
    assert os.path.isfile(os.path.join(demo, "promptkd", "plots", "prompt_loss.png"))


def test_input_errors_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: promptkd\nlearning_rate: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key(s) learning_rate" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "promptkd.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "train" in result.stdout
