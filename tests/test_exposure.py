"""Exposure bias (ExAccErr, ``promptkd.train.exposure`` and ``promptkd exposure``): the curves against a plain
float64 reference on full logits, a student equal to its teacher, determinism, eos masking, the command's
files and overwrite rule, and bad inputs.

Models are tiny random ones (a GPT-2 teacher, a Llama student with another hidden size and an untied head)
over a 40-word tokenizer; the sampled responses end at eos often enough that some stop before L.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_decoder
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from promptkd.cli import main
from promptkd.train.exposure import (
    Continuations,
    excess_accumulated_error,
    exposure_bias,
    sample_continuations,
    step_errors,
)

WORDS = ["[PAD]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(37)]
PAD, EOS = 0, 1
PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11", "w12 w13 w14"]  # lengths 3, 2, 5, 1, 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = dict(samples=3, max_length=12, seed=5, batch_size=4)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def tiny_teacher(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS), n_positions=64, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def tiny_student(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, bos_token_id=EOS,
                         eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    return tiny_teacher(), tiny_student()


# ---- the plain reference ---------------------------------------------------------------------------

@torch.no_grad()
def reference_step_sums(teacher, student, c: Continuations) -> list[float]:
    """sum over sequences of KL(p || q) at each response step, from full float64 logits, one sequence at a
    time (no padding, no batching): position len(prompt) - 1 + j predicts step j + 1."""
    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    sums = [0.0] * c.max_length
    for prompt, response, closed in zip(c.prompts, c.responses, c.closed, strict=True):
        ids = torch.tensor([prompt + response + ([EOS] if closed else [])])
        mask = torch.ones_like(ids)
        log_p = F.log_softmax(teacher(ids, attention_mask=mask).logits[0], dim=-1)
        log_q = F.log_softmax(student(ids, attention_mask=mask).logits[0], dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]
        for j in range(len(response) + closed):
            sums[j] += kl[len(prompt) - 1 + j].item()
    return sums


def reference_curves(teacher, student, tok, prompts, samples, max_length, seed, batch_size) -> dict:
    own = sample_continuations(student, tok, prompts, samples=samples, max_length=max_length, seed=seed,
                               batch_size=batch_size)
    oracle = sample_continuations(teacher, tok, prompts, samples=samples, max_length=max_length, seed=seed,
                                  batch_size=batch_size)
    n = len(own.responses)
    R, acc = [], []
    for sums, out in ((reference_step_sums(teacher, student, own), R),
                      (reference_step_sums(teacher, student, oracle), acc)):
        total = 0.0
        for value in sums:
            total += value
            out.append(total / n)
    exaccerr = [100 * (r - e) / e for r, e in zip(R, acc, strict=True)]
    return {"R": R, "accumulated_eps": acc, "exaccerr": exaccerr, "own": own, "oracle": oracle}


def rel_err(x: list[float], ref: list[float]) -> float:
    x, ref = torch.tensor(x, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((x - ref).abs().max() / ref.abs().max()).item()


# ---- the library -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_curves_match_float64_reference(models, tok, dtype):
    teacher, student = (copy.deepcopy(m).to(dtype) for m in models)
    got = exposure_bias(teacher, student, tok, PROMPTS, **SETTINGS)
    ref = reference_curves(teacher, student, tok, PROMPTS, **SETTINGS)
    # The samples end at different lengths (eos) and some run to L: every case of the masking is present.
    assert min(got["student_counts"]) < got["num_sequences"] == 15 and got["student_counts"][-1] > 0
    assert got["student_counts"] == ref["own"].steps() and got["teacher_counts"] == ref["oracle"].steps()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for key in ("R", "accumulated_eps"):
        assert rel_err(got[key], ref[key]) < tol, key
    assert rel_err(got["exaccerr"], ref["exaccerr"]) < 10 * tol  # a ratio of a difference of close sums
    assert got["eps"] == pytest.approx([a / (i + 1) for i, a in enumerate(got["accumulated_eps"])], rel=1e-12)
    assert got["length"] == list(range(1, 13))
    # Step 1 is predicted from the prompt alone: the same prefix for both, so no excess there.
    assert got["R"][0] == pytest.approx(got["accumulated_eps"][0], rel=1e-6) and got["R"][0] > 0


def test_curves_of_a_softcapped_teacher_match_float64_reference(models, tok):
    """A Gemma 2 teacher whose final-logit softcap (tight: it matters) shapes its logits: the curves use the
    teacher's own distribution (the cap read from its config), as the full-logit reference does."""
    teacher = tiny_decoder("gemma2", vocab_size=len(WORDS), bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                           initializer_range=0.3, final_logit_softcapping=0.5)
    student = models[1]
    got = exposure_bias(teacher, student, tok, PROMPTS, **SETTINGS)
    ref = reference_curves(teacher, student, tok, PROMPTS, **SETTINGS)
    for key in ("R", "accumulated_eps"):
        assert rel_err(got[key], ref[key]) < 1e-6, key  # float32 models (Gemma 2 in float64 gives NaN on padding)
    teacher.config.final_logit_softcapping = None  # the curves of the uncapped teacher differ: the test can fail
    assert rel_err(exposure_bias(teacher, student, tok, PROMPTS, **SETTINGS)["R"], ref["R"]) > 1e-3


def test_student_equal_to_teacher_gives_zero(models, tok, recwarn):
    teacher = models[0]
    got = exposure_bias(teacher, copy.deepcopy(teacher), tok, PROMPTS, **SETTINGS)
    assert got["eps"] == [0.0] * 12 and got["R"] == [0.0] * 12
    assert got["exaccerr"] == [0.0] * 12  # 0 / 0: no error on either prefixes, so no excess
    assert got["student_counts"] == got["teacher_counts"]  # the same seed draws the same responses
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_ratio_rule():
    got = excess_accumulated_error([0.0, 1.0, 3.0, 2.0], [0.0, 0.0, 2.0, 4.0])
    assert got[0] == 0.0 and math.isnan(got[1]) and got[2:] == [50.0, -50.0]


def test_deterministic_given_the_seed(models, tok):
    teacher, student = models
    a = exposure_bias(teacher, student, tok, PROMPTS, **SETTINGS)
    torch.manual_seed(1234)  # the caller's RNG state plays no part
    b = exposure_bias(teacher, student, tok, PROMPTS, **SETTINGS)
    assert a == b
    c = exposure_bias(teacher, student, tok, PROMPTS, **{**SETTINGS, "seed": 6})
    assert c["R"] != a["R"]


def test_ended_sequences_contribute_no_later_steps(models, tok):
    """Hand-made responses of 1 + eos, 3 (cut at L = 3, no eos) and 0 + eos steps, batched together (so the
    short ones are padded): each step's sum is exactly the KL of the sequences still running at that step."""
    teacher, student = models
    c = Continuations(prompts=[[3, 4], [5], [6, 7, 8]], responses=[[9], [10, 11, 12], []],
                      closed=[True, False, True], max_length=3)
    assert c.steps() == [3, 2, 1]
    got = step_errors(teacher, student, tok, c, batch_size=3)
    ref = reference_step_sums(teacher, student, c)
    assert rel_err(got, ref) < 1e-6
    only_second = Continuations([[5]], [[10, 11, 12]], [False], 3)
    assert got[2] == pytest.approx(step_errors(teacher, student, tok, only_second)[2], rel=1e-6)
    # An eos step counts, and nothing after it: the first sequence's two steps, alone.
    first = step_errors(teacher, student, tok, Continuations([[3, 4]], [[9]], [True], 3))
    assert first[2] == 0.0 and first[1] > 0


def test_library_argument_errors(models, tok):
    teacher, student = models
    for changes, message in (({"samples": 0}, "samples must be >= 1"), ({"max_length": 0}, "max_length must be >= 1"),
                             ({"seed": -1}, "seed must be >= 0"), ({"batch_size": 0}, "batch_size must be >= 1")):
        with pytest.raises(ValueError, match=message):
            exposure_bias(teacher, student, tok, PROMPTS, **{**SETTINGS, **changes})
    with pytest.raises(ValueError, match="non-empty list"):
        exposure_bias(teacher, student, tok, [], **SETTINGS)
    other = sample_continuations(teacher, tok, PROMPTS[:2], **SETTINGS)
    with pytest.raises(ValueError, match="teacher_samples were drawn"):
        exposure_bias(teacher, student, tok, PROMPTS, teacher_samples=other, **SETTINGS)


# ---- the command -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, models, tok):
    root = tmp_path_factory.mktemp("exposure")
    paths = {}
    for name, model in (("teacher", models[0]), ("student", models[1]), ("other", tiny_student(seed=7))):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    paths["data"] = str(root / "prompts.jsonl")
    with open(paths["data"], "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt, "response": "w20 w21"}) + "\n")
    return paths


def run_exposure(saved, out, *extra):
    return main(["exposure", "--teacher", saved["teacher"], "--student", saved["student"], "--student",
                 f"seven={saved['other']}", "--data", saved["data"], "--max-length", "6", "--samples", "2",
                 "--seed", "3", "--batch-size", "4", "--device", "cpu", "--out", str(out), *extra])


def test_command_writes_json_and_png_and_never_overwrites(saved, tmp_path, tok, capsys):
    out = tmp_path / "exposure"
    assert run_exposure(saved, out) == 0
    assert "student: ExAccErr" in capsys.readouterr().out
    report = json.loads((out / "exposure.json").read_text())
    assert list(report["students"]) == ["student", "seven"]
    assert report["num_prompts"] == 5 and report["samples"] == 2 and report["max_length"] == 6
    curve = report["students"]["student"]
    assert curve["path"] == saved["student"] and curve["length"] == [1, 2, 3, 4, 5, 6]
    # The command's curve is the library's on the same models, prompts (ids as load_examples makes them) and seed.
    teacher, student = (GPT2LMHeadModel.from_pretrained(saved["teacher"]),
                        LlamaForCausalLM.from_pretrained(saved["student"]))
    direct = exposure_bias(teacher, student, tok, PROMPTS, samples=2, max_length=6, seed=3, batch_size=4)
    assert curve["R"] == pytest.approx(direct["R"], rel=1e-6) and curve["exaccerr"] == pytest.approx(
        direct["exaccerr"], rel=1e-5, abs=1e-6)
    assert (out / "exposure.png").read_bytes()[:8] == PNG_SIGNATURE

    assert run_exposure(saved, out) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (out / "exposure.json").write_text("old")
    assert run_exposure(saved, out, "--overwrite") == 0
    assert json.loads((out / "exposure.json").read_text()) == report  # the same seed, the same curves


def test_command_input_errors_exit_2_before_loading(saved, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("promptkd.hf.models.load_model", no_loading)
    taken = tmp_path / "taken"
    taken.write_text("")
    base = ["exposure", "--teacher", saved["teacher"], "--student", saved["student"], "--data", saved["data"],
            "--max-length", "4", "--samples", "1", "--out", str(tmp_path / "out")]
    for args, message in ((["--max-length", "0"], "--max-length must be >= 1"),
                          (["--samples", "0"], "--samples must be >= 1"),
                          (["--seed", "-2"], "--seed must be >= 0"),
                          (["--data", str(tmp_path / "missing.jsonl")], "--data: no file"),
                          (["--out", str(taken)], "is a file"),
                          (["--teacher", str(tmp_path / "nowhere")], "does not exist"),
                          (["--student", saved["student"]], "two students named 'student'"),
                          (["--device", "banana"], "device must be")):
        assert main(base + args) == 2, args
        assert message in capsys.readouterr().err, args
    assert not os.path.exists(tmp_path / "out")
