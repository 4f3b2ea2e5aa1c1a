"""The ``promptkd`` command: the quick demo end to end (and resumed after a crash), then eval and plot on
its output; exit codes: 2 for input errors only, faults keep their traceback."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from promptkd.cli import main
from promptkd.demo.run import METHODS
from promptkd.train import trainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert main(["demo", "--quick", "--out", out]) == 0
    return out


def test_quick_demo_writes_table_and_plots(demo):
    results = json.load(open(os.path.join(demo, "results.json")))
    assert list(results["scores"]) == ["teacher", "sft_init", "sft", *METHODS]
    table = open(os.path.join(demo, "results.md")).read()
    assert table.startswith("| model |") and "| promptkd |" in table
    for name, scores in results["scores"].items():
        test, heldout = scores["test"], scores["test_heldout"]
        for split in (test, heldout):  # the summary is the mean and population std of the per-seed scores
            per_seed = [s["rougeL"] for s in split["per_seed"]]
            assert split["rougeL"] == pytest.approx(statistics.fmean(per_seed), abs=1e-9)
            assert split["rougeL_std"] == pytest.approx(statistics.pstdev(per_seed), abs=1e-9)
        row = (f"| {name} | {test['rougeL']:.1f} ± {test['rougeL_std']:.1f} | "
               f"{test['exact_match']:.1f} ± {test['exact_match_std']:.1f} | "
               f"{heldout['rougeL']:.1f} ± {heldout['rougeL_std']:.1f} | "
               f"{heldout['exact_match']:.1f} ± {heldout['exact_match_std']:.1f} |")
        assert row in table.splitlines(), row
    assert "What this table can show" in table and "- promptkd: " in table
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
    generations = [json.loads(line) for line in open(os.path.join(out, "test.generations.jsonl"))]
    assert len(generations) == 5
    # The first seed's score, recomputed from the written generations with rouge-score itself.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    recomputed = statistics.fmean(100 * max(scorer.score(r, g["prediction"])["rougeL"].fmeasure
                                            for r in g["references"]) for g in generations)
    assert scores["test"]["per_seed"][0]["rougeL"] == pytest.approx(recomputed, abs=1e-9)
    assert "ROUGE-L" in capsys.readouterr().out
    assert main(["plot", os.path.join(demo, "promptkd")]) == 0
    assert os.path.isfile(os.path.join(demo, "promptkd", "plots", "prompt_loss.png"))


def test_demo_never_overwrites_and_resumes_after_a_crash(demo, tmp_path, monkeypatch, capsys):
    """A demo directory is refused without --resume / --overwrite; a demo killed during one stage and
    resumed keeps the finished stages and ends with the uninterrupted run's results."""
    assert main(["demo", "--quick", "--out", demo]) == 2
    assert "holds a previous demo run" in capsys.readouterr().err
    assert main(["demo", "--out", demo, "--resume"]) == 2  # other settings than the run's (not --quick)
    assert "with other settings" in capsys.readouterr().err

    out = str(tmp_path / "crashed")
    original = trainer.Trainer._step

    def crash(self, step):
        if self.run_dir.endswith("rkl") and step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer.Trainer, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--quick", "--out", out])
    monkeypatch.setattr(trainer.Trainer, "_step", original)
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", out, "--resume"]) == 0
    log = capsys.readouterr().out
    for stage in ("teacher", "sft_init", "sft", "kd"):
        assert f"{stage}: trained earlier" in log
    assert "rkl: trained in" in log
    resumed = json.load(open(os.path.join(out, "results.json")))["scores"]
    assert resumed == json.load(open(os.path.join(demo, "results.json")))["scores"]


def test_demo_overwrite_removes_only_the_demo(tmp_path):
    from promptkd.demo.run import ENTRIES
    from promptkd.demo.stages import start

    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "results.md").write_text("old")
    (out / "mine.txt").write_text("kept")
    assert start(str(out), {"seed": 1}, resume=False, overwrite=True, manifest_name="demo.json", entries=ENTRIES,
                 what="demo run") is False
    assert sorted(os.listdir(out)) == ["demo.json", "mine.txt"]


def test_input_errors_exit_2(demo, tmp_path, capsys, monkeypatch):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: promptkd\nlearning_rate: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key(s) learning_rate" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("promptkd.hf.models.load_model", no_loading)
    taken = tmp_path / "taken"
    taken.write_text("")
    model, data = os.path.join(demo, "sft", "final", "model"), os.path.join(demo, "data", "test.jsonl")
    for args, message in ((["--out", str(taken)], "is a file"), (["--device", "banana"], "device must be"),
                          (["--batch-size", "0"], "--batch-size must be >= 1")):
        assert main(["eval", "--model", model, "--data", data, *args]) == 2
        assert message in capsys.readouterr().err


def test_faults_are_not_reported_as_input_errors(tmp_path, monkeypatch):
    """A TypeError or ValueError from inside promptkd is a fault: it propagates with its traceback (exit
    status 1 from the console script), never the one-line input error of status 2."""
    good = tmp_path / "good.yaml"
    good.write_text("method: sft\n")

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr("promptkd.train.trainer.train", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["train", str(good)])


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "promptkd.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "train" in result.stdout
