"""The trainer: every method runs, the PromptKD step equals its eager formula, resume is bit-identical
(also after SIGKILL), a NaN loss stops the run, bad inputs fail before training, shipped configs load.

Models are tiny Llama-style configs on the bundled tasks and a locally trained tokenizer (see
``promptkd.demo.run.prepare``); the losses run the ``torch`` implementations on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import NEWER_FAMILIES, tiny_decoder

import promptkd
from promptkd.demo.run import DemoSettings, prepare
from promptkd.errors import InputError, TrainingDiverged
from promptkd.hf.models import LMOutput, linear_cross_entropy
from promptkd.train import TrainConfig, Trainer, train
from promptkd.train.checkpoints import checkpoints
from promptkd.train.config import METHODS, shipped_configs
from promptkd.train.methods import Distillation

TINY = DemoSettings(n_train=48, n_valid=6, n_test=6, vocab_size=300, teacher=(32, 2, 2, 64), student=(16, 1, 2, 32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return prepare(str(root / "assets"), TINY, seed=3, log=lambda _: None)


def config(paths, out, **changes) -> TrainConfig:
    values = dict(method="kd", student=paths["student_init"], teacher=paths["teacher_init"],
                  train_file=paths["train"], valid_file="", output_dir=str(out), max_length=200, max_prompt_length=180,
                  batch_size=4, max_steps=3, lr=1e-3, warmup_steps=1, max_new_tokens=6, progress=False,
                  tensorboard=False, loss_impl="torch", attention_impl="torch", device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def weights(run_dir, which="final") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, which, "model", "model.safetensors"))


def assert_same(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(setup, tmp_path, method):
    cfg = config(setup, tmp_path / method, method=method, valid_file=setup["valid"], eval_interval=2,
                 eval_max_new_tokens=4, max_valid_examples=3)
    run_dir = train(cfg, log=lambda _: None)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(x["train/loss"])) for x in lines)
    assert "valid/rougeL" in lines[1] and "valid/rougeL" in lines[2]
    start = load_file(os.path.join(setup["student_init"], "model.safetensors"))
    end = weights(run_dir)
    assert any(not torch.equal(start[k], end[k]) for k in start), "the student did not change"
    assert os.path.isdir(os.path.join(run_dir, "best", "model"))
    assert [os.path.basename(c) for c in checkpoints(run_dir)] == ["checkpoint-0000003"]
    if method == "promptkd":
        assert os.path.isfile(os.path.join(run_dir, "final", "prompt", "adapter_model.safetensors"))
        assert "prompt/loss" in lines[0]


@pytest.mark.parametrize("loss_impl", ["torch", "chunked"])  # two losses / one fused_linear_kl_pair_loss
def test_promptkd_step_equals_eager_formula(setup, tmp_path, loss_impl):
    """One PromptKD step's prompt gradient and student loss against HF logits + eager KL in float64."""
    cfg = config(setup, tmp_path / "run", method="promptkd", batch_size=3, max_steps=5, prompt_reg=0.7,
                 loss_impl=loss_impl)
    trainer = Trainer(cfg, log=lambda _: None)
    step = 2
    examples = [trainer.train_examples[i] for i in trainer.order.micro_batches(step, 0)[0]]
    batch, _ = trainer.distill.batch(*trainer.distill.on_policy(examples, step, 0))
    labels = batch["labels"]
    counted = labels != -100
    prompted = trainer.prompted

    def log_probs(logits):
        return torch.log_softmax(logits.double(), -1)[counted]

    def kl(log_p, log_q):  # KL(p || q) per token, mean over counted tokens
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    with torch.no_grad():
        student = log_probs(trainer.student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits)
        plain = log_probs(prompted(batch["input_ids"], batch["attention_mask"], use_prompt=False,
                                   return_logits=True).logits)
    teacher = log_probs(prompted(batch["input_ids"], batch["attention_mask"], return_logits=True).logits)
    reg = 0.7 * (1 - step / 5)
    eager = kl(teacher, student) + reg * kl(teacher, plain)
    (expected,) = torch.autograd.grad(eager, prompted.soft_prompt)

    # The trainer's prompt loss for the same batch (PromptKD's prompt phase, one micro-batch).
    fused = trainer.distill.prompt_loss(batch, reg)
    (got,) = torch.autograd.grad(fused, prompted.soft_prompt)
    torch.testing.assert_close(fused.double(), eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-7)

    # Student step: KL(q_S || p_TP), gradient to the student only.
    loss = trainer.distill.student_loss(batch)
    eager_student = kl(log_probs(trainer.student(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits), teacher.detach())
    torch.testing.assert_close(loss.double(), eager_student, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["promptkd", "rkl"])
def test_share_prefix_equals_replicated_instructions(setup, tmp_path, method):
    """num_samples=3 with share_prefix: the same samples, losses and gradients (prompt and student) as
    running every sample's instruction in full, from batches a fraction of the width."""
    results, widths = [], []
    for share in (False, True):
        cfg = config(setup, tmp_path / f"run{share}", method=method, batch_size=3, num_samples=3, max_steps=5,
                     share_prefix=share)
        trainer = Trainer(cfg, log=lambda _: None)
        examples = [trainer.train_examples[i] for i in trainer.order.micro_batches(2, 0)[0]]
        batch, tokens = trainer.distill.batch(*trainer.distill.on_policy(examples, 2, 0), shared=share)
        widths.append(batch["input_ids"].shape[1])
        result = {"tokens": torch.tensor(float(tokens))}
        labels = batch["labels"]
        if method == "promptkd":
            loss = trainer.distill.prompt_loss(batch, 0.6)
            (result["prompt_grad"],) = torch.autograd.grad(loss, trainer.prompted.soft_prompt)
            result["prompt_loss"] = loss.detach()
            loss = trainer.distill.student_loss(batch)
        else:
            with torch.no_grad():
                teacher = trainer.distill.teacher(batch)
            loss = trainer.distill.kd(trainer.distill.student(batch), teacher, labels, "reverse_kl")
        loss.backward()
        result["loss"] = loss.detach()
        result.update({n: p.grad for n, p in trainer.student.named_parameters()})
        results.append(result)
    assert widths[1] < widths[0] / 3  # the rows hold the instruction's last token and the response only
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_share_prefix_runs_saves_and_checks_its_models(setup, tmp_path):
    cfg = config(setup, tmp_path / "run", method="promptkd", num_samples=2, share_prefix=True, max_steps=2,
                 gradient_checkpointing=True)
    run_dir = train(cfg, log=lambda _: None)
    from transformers import AutoModelForCausalLM

    with open(os.path.join(run_dir, "final", "model", "config.json")) as f:
        assert "promptkd" not in f.read()  # the saved student loads anywhere, without promptkd registered

    with pytest.raises(ValueError, match="share_prefix applies to methods that sample"):
        TrainConfig(method="kd", share_prefix=True)
    student = AutoModelForCausalLM.from_pretrained(setup["student_init"])
    student.config.attention_dropout = 0.1
    student.save_pretrained(tmp_path / "dropout")
    with pytest.raises(ValueError, match="share_prefix: the student has attention dropout 0.1"):
        Trainer(config(setup, tmp_path / "bad", method="rkl", share_prefix=True, student=str(tmp_path / "dropout"),
                       tokenizer=setup["student_init"]), log=lambda _: None)


def family_pair(setup, root, family: str, student_changes=None, **teacher_changes) -> dict:
    """A teacher and a student of ``family`` (tiny, random) with the setup's tokenizer, saved under ``root``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["student_init"])
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512)
    if family.startswith("gemma"):
        special["sliding_window"] = 512  # prefix attention refuses a window that would cut the prompt off
    paths = {}
    for name, hidden, changes in (("teacher", 32, teacher_changes), ("student", 16, student_changes or {})):
        paths[name] = str(root / name)
        tiny_decoder(family, hidden=hidden, **special, **changes).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("family", NEWER_FAMILIES)
def test_newer_families_train(setup, tmp_path, family):
    """promptkd with shared prefixes (the prompted teacher and both models' attention through prefix
    attention, the student's samples) on a teacher and a student of each newer family: finite losses,
    a student that changed, a validation pass (generation)."""
    pair = family_pair(setup, tmp_path, family)
    cfg = config(setup, tmp_path / "run", method="promptkd", student=pair["student"], teacher=pair["teacher"],
                 num_samples=2, share_prefix=True, max_steps=2, max_new_tokens=4, valid_file=setup["valid"],
                 eval_interval=2, eval_max_new_tokens=4, max_valid_examples=2)
    run_dir = train(cfg, log=lambda _: None)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2]
    assert "valid/rougeL" in lines[1]  # evaluation generates with the family's own model
    assert all(torch.isfinite(torch.tensor([x["train/loss"], x["prompt/loss"]])).all() for x in lines)
    start = load_file(os.path.join(pair["student"], "model.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in weights(run_dir).items()), "the student did not change"


def test_kd_and_sft_on_a_gemma2_pair_are_the_losses_of_their_own_logits(setup, tmp_path):
    """A Gemma 2 teacher and student with their final-logit softcaps (tight ones, so they matter) and the
    teacher's attention softcap: the trainer reads the caps from the configs, and its kd loss (soft and hard
    terms), sft cross-entropy and promptkd prompt loss equal those computed in float64 from the models' own
    logits (the prompted teacher's without the prompt equal to the model's)."""
    pair = family_pair(setup, tmp_path, "gemma2", student_changes=dict(final_logit_softcapping=0.8,
                                                                       initializer_range=0.5),
                       final_logit_softcapping=0.5, attn_logit_softcapping=50.0, initializer_range=0.5)
    trainer = Trainer(config(setup, tmp_path / "kd", student=pair["student"], teacher=pair["teacher"], kd_ratio=0.6,
                             batch_size=3), log=lambda _: None)
    distill = trainer.distill
    examples = [trainer.train_examples[i] for i in trainer.order.micro_batches(1, 0)[0]]
    batch, _ = distill.batch(*distill.ground_truth(examples))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = (m(**inputs).logits.double() for m in (trainer.student, trainer.teacher))
    labels = batch["labels"]
    eager = promptkd.kd_loss(s, t, labels, soft_weight=0.6, hard_weight=0.4, impl="reference")
    loss, _ = distill.micro_loss(examples, 1, 0)
    torch.testing.assert_close(loss.double(), eager, rtol=1e-5, atol=1e-6)
    student = distill.student(batch)
    with torch.no_grad():
        teacher = distill.teacher(batch)
    assert teacher.transform == (1.0, 0.5)
    uncapped = promptkd.fused_linear_kd_loss(student.hidden, student.weight, teacher.hidden, teacher.weight, labels,
                                             soft_weight=0.6, hard_weight=0.4)
    assert abs(uncapped.item() - eager.item()) > 0.1, "the caps did not matter: the test could not fail"
    assert student.transform == (1.0, 0.8)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(linear_cross_entropy(student, labels).double(), ce, rtol=1e-5, atol=1e-6)
    uncapped = linear_cross_entropy(LMOutput(student.hidden, student.weight, student.bias), labels)
    assert abs(uncapped.item() - ce.item()) > 0.1, "the cap did not matter: the test could not fail"
    # promptkd on the same pair: the prompted teacher's attention softcap and final softcap, the student's cap.
    from transformers import AutoModelForCausalLM

    cfg = config(setup, tmp_path / "promptkd", method="promptkd", student=pair["student"], teacher=pair["teacher"],
                 batch_size=3, max_steps=5, prompt_reg=0.7)
    trainer = Trainer(cfg, log=lambda _: None)
    batch, _ = trainer.distill.batch(*trainer.distill.on_policy(examples, 2, 0))
    counted = batch["labels"] != -100
    prompted = trainer.prompted

    def log_probs(logits):
        return torch.log_softmax(logits.double(), -1)[counted]

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        q = log_probs(trainer.student(input_ids=inputs[0], attention_mask=inputs[1]).logits)
        a = log_probs(prompted(*inputs, use_prompt=False, return_logits=True).logits)
        fresh = AutoModelForCausalLM.from_pretrained(pair["teacher"]).eval()  # its own attention implementation
        plain = log_probs(fresh(input_ids=inputs[0], attention_mask=inputs[1]).logits)
    torch.testing.assert_close(a, plain, rtol=1e-5, atol=1e-6)  # the model's own (capped) logits
    p = log_probs(prompted(*inputs, return_logits=True).logits)
    reg = 0.7 * (1 - 2 / 5)
    eager = kl(p, q) + reg * kl(p, a)
    torch.testing.assert_close(trainer.distill.prompt_loss(batch, reg).double(), eager, rtol=1e-5, atol=1e-6)


def test_prompt_step_touches_only_the_prompt(setup, tmp_path):
    cfg = config(setup, tmp_path / "run", method="promptkd", max_steps=2)
    trainer = Trainer(cfg, log=lambda _: None)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    prompt_before = trainer.prompted.soft_prompt.detach().clone()
    trainer.train()
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())
    assert not torch.equal(prompt_before, trainer.prompted.soft_prompt.detach())


def test_resume_is_bit_identical(setup, tmp_path, monkeypatch):
    base = dict(method="gkd", gkd_lambda=0.5, max_steps=5, save_interval=2, batch_size=2, gradient_accumulation=2)
    full = train(config(setup, tmp_path / "full", **base), log=lambda _: None)

    crash_at = 3
    original = Trainer._step

    def crashing(self, step):
        if step == crash_at:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "_step", crashing)
    cut = config(setup, tmp_path / "cut", **base)
    with pytest.raises(KeyboardInterrupt):
        train(cut, log=lambda _: None)
    assert [os.path.basename(c) for c in checkpoints(cut.output_dir)] == ["checkpoint-0000002"]
    monkeypatch.setattr(Trainer, "_step", original)
    with pytest.raises(InputError, match="holds a previous run"):
        Trainer(cut, log=lambda _: None)
    train(cut, resume=True, log=lambda _: None)
    assert_same(weights(full), weights(cut.output_dir))
    steps = [json.loads(x)["step"] for x in open(os.path.join(cut.output_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_after_sigkill(setup, tmp_path):
    """``promptkd train`` killed with SIGKILL mid-run, then ``--resume``: the same weights as a run
    that was never interrupted."""
    import yaml

    base = dict(method="promptkd", max_steps=6, save_interval=1, batch_size=2)
    full = train(config(setup, tmp_path / "full", **base), log=lambda _: None)
    cfg = config(setup, tmp_path / "killed", **base)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "promptkd.cli", "train", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.endswith("0000003") for c in checkpoints(cfg.output_dir)):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoints(cfg.output_dir)
    assert done and not done[-1].endswith("0000006"), "the run finished before it could be killed"
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same(weights(full), weights(cfg.output_dir))
    a = load_file(os.path.join(full, "final", "prompt", "adapter_model.safetensors"))
    b = load_file(os.path.join(cfg.output_dir, "final", "prompt", "adapter_model.safetensors"))
    assert_same(a, b)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    original = Distillation.micro_loss

    def poisoned(self, examples, step, micro):
        loss, tokens = original(self, examples, step, micro)
        return (loss * float("nan") if step == 2 else loss), tokens

    monkeypatch.setattr(Distillation, "micro_loss", poisoned)
    cfg = config(setup, tmp_path / "run", max_steps=4, save_interval=1)
    with pytest.raises(TrainingDiverged, match=r"step 3: the training loss is nan.*checkpoint-0000002"):
        train(cfg, log=lambda _: None)
    assert [os.path.basename(c) for c in checkpoints(cfg.output_dir)] == ["checkpoint-0000001", "checkpoint-0000002"]


def write(path, lines):
    path.write_text("".join(lines))
    return str(path)


@pytest.mark.parametrize("case", ["malformed", "missing_field", "empty", "not_object"])
def test_bad_data_names_file_and_line(setup, tmp_path, case):
    good = '{"instruction": "Say hi.", "response": "hi"}\n'
    lines = {"malformed": [good, '{"instruction": "x", \n'], "missing_field": [good, good, '{"instruction": "x"}\n'],
             "empty": ["\n"], "not_object": [good, "[1, 2]\n"]}[case]
    path = write(tmp_path / "data.jsonl", lines)
    expected = {"malformed": r"data.jsonl:2: not valid JSON",
                "missing_field": r"data.jsonl:3: missing field 'response'", "empty": "holds no records",
                "not_object": r"data.jsonl:2: expected a JSON object"}[case]
    with pytest.raises(ValueError, match=expected):
        Trainer(config(setup, tmp_path / "run", train_file=path), log=lambda _: None)
    assert not os.path.exists(tmp_path / "run")


def test_prompt_starts_from_the_teachers_tokens_of_the_init_text(setup, tmp_path):
    """The soft prompt is the teacher's input embeddings of ``prompt_init_text`` as the teacher's tokenizer
    splits it, even when the run's tokenizer (``tokenizer=``, same ids) splits it otherwise."""
    from transformers import AutoTokenizer

    plain = tmp_path / "no_merges"
    AutoTokenizer.from_pretrained(setup["student_init"]).save_pretrained(plain)
    spec = json.loads((plain / "tokenizer.json").read_text())
    spec["model"]["merges"] = []  # the same vocabulary, every word split to bytes
    shutil.copy(os.path.join(setup["student_init"], "config.json"), plain)
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    text = "Answer the question."
    trainer = Trainer(config(setup, tmp_path / "run", method="promptkd", prompt_length=12, prompt_init_text=text,
                             tokenizer=str(plain)), log=lambda _: None)
    teacher_ids = AutoTokenizer.from_pretrained(setup["teacher_init"])(text)["input_ids"]
    run_ids = trainer.tokenizer(text)["input_ids"]
    assert len(run_ids) > len(teacher_ids)  # the two tokenizers really split the text differently
    ids = (teacher_ids * 12)[:12]
    expected = trainer.teacher.get_input_embeddings().weight[ids]
    assert torch.equal(trainer.prompted.soft_prompt.detach(), expected)
    trainer.close()


def test_bad_paths_and_tokenizers(setup, tmp_path):
    with pytest.raises(ValueError, match="student: model path .* does not exist"):
        Trainer(config(setup, tmp_path / "a", student=str(tmp_path / "nowhere")), log=lambda _: None)
    with pytest.raises(ValueError, match="teacher: model path"):
        Trainer(config(setup, tmp_path / "b", teacher="./no/such/teacher"), log=lambda _: None)
    with pytest.raises(ValueError, match="needs teacher"):
        Trainer(config(setup, tmp_path / "c", teacher=""), log=lambda _: None)
    # A teacher whose tokenizer numbers tokens differently.
    from transformers import AutoModelForCausalLM

    from promptkd.demo.tokenizer import train_tokenizer

    other = str(tmp_path / "other_teacher")
    AutoModelForCausalLM.from_pretrained(setup["teacher_init"]).save_pretrained(other)
    train_tokenizer(["completely different text " * 20, "zebra quartz"], vocab_size=300).save_pretrained(other)
    with pytest.raises(ValueError, match="disagree on .* token id"):
        Trainer(config(setup, tmp_path / "d", teacher=other), log=lambda _: None)


def test_config_errors_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dpo")
    with pytest.raises(ValueError, match="gkd_beta"):
        TrainConfig(gkd_beta=1.0)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(ValueError, match="num_samples > 1"):
        TrainConfig(method="kd", num_samples=2)
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.load("gpt2-xl_to_gpt2-base", ["lr"])
    cfg = TrainConfig.load("gpt2-xl_to_gpt2-base", ["lr=2e-5", "eval_seeds=[1,2]", "method=kd"])
    assert (cfg.lr, cfg.eval_seeds, cfg.method) == (2e-5, (1, 2), "kd")


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_configs_parse(name):
    cfg = TrainConfig.load(name)
    assert cfg.method == "promptkd" and cfg.seed == 10 and cfg.max_length == 512 and cfg.max_prompt_length == 256
    assert cfg.weight_decay == 0.01 and cfg.clip_grad_norm == 1.0 and cfg.warmup_steps == 100
    effective = cfg.batch_size * cfg.gradient_accumulation
    assert effective == (256 if name.endswith("gpt2-base") else 64)
    expected_lr = {"gpt2-base": 5e-5, "gpt2-medium": 1e-5, "gpt2-large": 5e-6}
    assert cfg.lr == expected_lr.get(name.split("_to_")[1], 5e-6)
    expected_epochs = {"gpt2-base": 20, "gpt2-medium": 20, "gpt2-large": 15}
    assert cfg.epochs == expected_epochs.get(name.split("_to_")[1], 10)


def test_shipped_config_runs_with_small_models(setup, tmp_path):
    overrides = [f"student={setup['student_init']}", f"teacher={setup['teacher_init']}", f"train_file={setup['train']}",
                 "valid_file=", f"output_dir={tmp_path / 'run'}", "max_steps=1", "batch_size=2",
                 "gradient_accumulation=2", "warmup_steps=1", "gradient_checkpointing=true", "progress=false",
                 "max_new_tokens=4"]
    cfg = TrainConfig.load("gpt2-xl_to_gpt2-base", overrides)
    run_dir = train(cfg, log=lambda _: None)
    assert os.path.isfile(os.path.join(run_dir, "final", "prompt", "adapter_config.json"))


# ---------------------------------------------------------------- faults: nothing lost, nothing non-finite


class _NaNGradient(torch.autograd.Function):
    """Identity forward; backward hands the input a NaN gradient (a finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _all_finite(directory) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(os.path.join(directory, "model", "model.safetensors"))
               .values())


def test_finite_loss_with_non_finite_gradient_stops_the_run(setup, tmp_path, monkeypatch):
    original = Distillation.micro_loss

    def poisoned(self, examples, step, micro):
        loss, tokens = original(self, examples, step, micro)
        if step == 2:
            weight = next(p for p in self.student_model.parameters() if p.requires_grad)
            loss = loss + 0.0 * _NaNGradient.apply(weight).sum()
        return loss, tokens

    monkeypatch.setattr(Distillation, "micro_loss", poisoned)
    cfg = config(setup, tmp_path / "run", max_steps=4, save_interval=1)
    with pytest.raises(TrainingDiverged, match=r"step 3: the training loss is finite \(.*\) but its gradient is not "
                                               r"\(norm nan\).*Last good checkpoint: .*checkpoint-0000002"):
        train(cfg, log=lambda _: None)
    kept = checkpoints(cfg.output_dir)
    assert [os.path.basename(c) for c in kept] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert all(_all_finite(c) for c in kept)
    assert not os.path.exists(os.path.join(cfg.output_dir, "final"))


def test_non_finite_weights_are_never_saved(setup, tmp_path, monkeypatch):
    """Finite loss and gradients, but the weights turn infinite (say an overflowing update): the save
    that would write them stops the run instead."""
    original = Trainer._apply

    def overflowing(self, step, what, loss_sum):
        out = original(self, step, what, loss_sum)
        if step == 2:
            with torch.no_grad():
                self.student_params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Trainer, "_apply", overflowing)
    cfg = config(setup, tmp_path / "run", max_steps=4, save_interval=1)
    with pytest.raises(TrainingDiverged, match=r"step 3: the weights are not finite.*checkpoint-0000002"):
        train(cfg, log=lambda _: None)
    assert [os.path.basename(c) for c in checkpoints(cfg.output_dir)] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert not os.path.exists(os.path.join(cfg.output_dir, ".tmp-checkpoint-0000003"))


def test_float16_training_is_refused():
    with pytest.raises(InputError, match="float16 .* loss scaling.*use bfloat16"):
        TrainConfig(dtype="float16")


def _two_steps(setup, tmp_path, **changes) -> TrainConfig:
    """A finished 2-step run (a checkpoint after each step); returns its config."""
    cfg = config(setup, tmp_path / "run", max_steps=2, save_interval=1, keep_checkpoints=5, **changes)
    train(cfg, log=lambda _: None)
    return cfg


@pytest.mark.parametrize("change", [dict(lr=2e-3), dict(seed=4), dict(batch_size=2), dict(method="rkl"),
                                    dict(train_file="other"), dict(gradient_accumulation=2), dict(dtype="float32")],
                         ids=lambda c: next(iter(c)))
def test_resume_refuses_settings_that_change_the_run(setup, tmp_path, change):
    cfg = _two_steps(setup, tmp_path)
    original_yaml = open(os.path.join(cfg.output_dir, "config.yaml")).read()
    if change.get("train_file") == "other":
        other = tmp_path / "other.jsonl"
        shutil.copy(setup["train"], other)
        change = dict(train_file=str(other))
    key = next(iter(change))
    with pytest.raises(InputError, match=rf"--resume: .*settings that would change the run \({key}: "):
        Trainer(cfg.replace(max_steps=3, **change), resume=True, log=lambda _: None)
    assert open(os.path.join(cfg.output_dir, "config.yaml")).read() == original_yaml


def test_resume_honours_a_longer_run_and_keeps_the_original_config(setup, tmp_path):
    cfg = _two_steps(setup, tmp_path)
    original_yaml = open(os.path.join(cfg.output_dir, "config.yaml")).read()
    longer = cfg.replace(max_steps=4, save_interval=2, log_interval=2)
    train(longer, resume=True, log=lambda _: None)
    assert open(os.path.join(cfg.output_dir, "config.yaml")).read() == original_yaml
    (record,) = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "resumes.jsonl"))]
    assert record["step"] == 2 and record["checkpoint"] == "checkpoint-0000002"
    assert record["changes"] == {"max_steps": {"from": 2, "to": 4}, "save_interval": {"from": 1, "to": 2},
                                 "log_interval": {"from": 1, "to": 2}}
    steps = [json.loads(x)["step"] for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 4]
    # The same as a 4-step run with those settings from the start: the change was applied whole.
    straight = train(config(setup, tmp_path / "straight", max_steps=4, save_interval=2, log_interval=2,
                            keep_checkpoints=5), log=lambda _: None)
    assert_same(weights(straight), weights(cfg.output_dir))
    state = json.load(open(os.path.join(checkpoints(cfg.output_dir)[-1], "trainer_state.json")))
    assert state["config"]["max_steps"] == 4


def test_resume_refuses_changed_training_data_under_the_same_path(setup, tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(setup["train"], data)
    cfg = _two_steps(setup, tmp_path, train_file=str(data))
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # the same records in another order
    with pytest.raises(InputError, match="is not the file .* was trained on"):
        Trainer(cfg, resume=True, log=lambda _: None)


def test_resume_needs_a_checkpoint(setup, tmp_path):
    with pytest.raises(InputError, match="does not exist; there is nothing to resume"):
        Trainer(config(setup, tmp_path / "nowhere"), resume=True, log=lambda _: None)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="holds no complete checkpoint; there is nothing to resume"):
        Trainer(config(setup, tmp_path / "empty"), resume=True, log=lambda _: None)
    assert os.listdir(tmp_path / "empty") == []


def test_a_planted_checkpoint_file_runs_no_code(setup, tmp_path):
    cfg = _two_steps(setup, tmp_path)
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    rng = os.path.join(checkpoints(cfg.output_dir)[-1], "rng-rank0.pt")
    torch.save({"python": Planted(), "torch": torch.get_rng_state()}, rng)
    with pytest.raises(InputError, match=r"cannot load .*rng-rank0.pt safely"):
        Trainer(cfg.replace(max_steps=3), resume=True, log=lambda _: None)
    assert not marker.exists()


def test_a_previous_run_is_never_overwritten_unless_asked(setup, tmp_path):
    cfg = _two_steps(setup, tmp_path)
    for c in checkpoints(cfg.output_dir):  # even without its checkpoints, the run is still there
        shutil.rmtree(c)
    before = {name: open(os.path.join(cfg.output_dir, name)).read() for name in ("config.yaml", "metrics.jsonl")}
    final = weights(cfg.output_dir)
    with pytest.raises(InputError, match=r"holds a previous run \(config.yaml, final, metrics.jsonl\); pass --resume"):
        Trainer(cfg, log=lambda _: None)
    with pytest.raises(InputError, match="exclude each other"):
        Trainer(cfg, resume=True, overwrite=True, log=lambda _: None)
    assert {name: open(os.path.join(cfg.output_dir, name)).read() for name in before} == before
    assert_same(final, weights(cfg.output_dir))
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not the run's: kept by --overwrite
    train(cfg.replace(max_steps=1, lr=2e-3), overwrite=True, log=lambda _: None)
    steps = [json.loads(x)["step"] for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert steps == [1] and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert "lr: 0.002" in open(os.path.join(cfg.output_dir, "config.yaml")).read()


def test_bad_output_dir_and_device_fail_before_any_model_loads(setup, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("promptkd.train.methods.load_model", no_loading)
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(InputError, match="output_dir .* is a file"):
        Trainer(config(setup, taken), log=lambda _: None)
    with pytest.raises(InputError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"):
        config(setup, tmp_path / "a", device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda:0': CUDA is not available"):
            Trainer(config(setup, tmp_path / "b", device="cuda:0"), log=lambda _: None)
    with pytest.raises(InputError, match="prompt_init_text must not be empty"):
        config(setup, tmp_path / "c", method="promptkd", prompt_init_text=" ")


def torchrun(setup, tmp_path, name, *extra, program=("-m", "promptkd.cli", "train"), **changes) -> str:
    """``promptkd train`` (or ``program``) under torchrun with 2 processes (gloo) on a config written to a file."""
    import yaml

    values = dict(batch_size=2, gradient_accumulation=1, max_steps=3)
    values.update(changes)
    cfg = config(setup, tmp_path / name, **values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr and "ProcessGroupLeak" not in result.stderr, result.stderr[-4000:]
    return cfg.output_dir


def test_data_parallel_run_frees_its_process_group(setup, tmp_path):
    """After train() under torchrun (gloo, data-parallel) the process group is freed and its worker
    threads have stopped before the interpreter exits: a gloo worker still alive then can abort a
    finished run (SIGABRT, "terminate called without an active exception")."""
    script = tmp_path / "train_then_count_threads.py"
    script.write_text(
        "import os, sys, warnings\n"
        "warnings.simplefilter('error', RuntimeWarning)  # a ProcessGroupLeak fails the run\n"
        "from promptkd.train.config import TrainConfig\n"
        "from promptkd.train.trainer import train\n"
        "train(TrainConfig.load(sys.argv[1]), log=lambda _: None)\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "assert not [n for n in names if 'gloo' in n], names\n")
    torchrun(setup, tmp_path, "ddp", program=(str(script),), method="rkl", valid_file=setup["valid"],
             eval_interval=3, max_valid_examples=2, eval_max_new_tokens=3)


def test_distributed_matches_single_process(setup, tmp_path):
    """torchrun, 2 processes (gloo): kd with the same global batch as one process with accumulation 2;
    rkl (sampling) twice: the same weights both times."""
    single = train(config(setup, tmp_path / "single", batch_size=2, gradient_accumulation=2, max_steps=3),
                   log=lambda _: None)
    assert_same(weights(single), weights(torchrun(setup, tmp_path, "ddp")), exact=False)
    first, second = torchrun(setup, tmp_path, "rkl1", method="rkl"), torchrun(setup, tmp_path, "rkl2", method="rkl")
    assert_same(weights(first), weights(second))


def test_fsdp_matches_data_parallel_and_resumes(setup, tmp_path):
    """fsdp: true under torchrun (2 processes, gloo): the same weights as the data-parallel run, with
    validation (generation on every process) and checkpoints; resuming from its step-2 checkpoint
    (per-process optimizer shards) reaches the uninterrupted run's weights bit for bit."""
    common = dict(max_steps=4, save_interval=2, valid_file=setup["valid"], eval_interval=2, max_valid_examples=3,
                  eval_max_new_tokens=4)
    data_parallel = torchrun(setup, tmp_path, "ddp", **common)
    sharded = torchrun(setup, tmp_path, "fsdp", fsdp=True, **common)
    assert_same(weights(data_parallel), weights(sharded), exact=False)
    assert sorted(os.listdir(os.path.join(sharded, "checkpoint-0000002"))) == [
        "model", "optimizer-rank0.pt", "optimizer-rank1.pt", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt",
        "trainer_state.json"]
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(os.path.join(sharded, "checkpoint-0000002"), tmp_path / "resumed" / "checkpoint-0000002")
    resumed = torchrun(setup, tmp_path, "resumed", "--resume", fsdp=True, **common)
    assert_same(weights(sharded), weights(resumed))

    with pytest.raises(ValueError, match="launch with torchrun"):
        Trainer(config(setup, tmp_path / "one", fsdp=True), log=lambda _: None)


def test_fsdp_prefix_passes_match_data_parallel(setup, tmp_path):
    """promptkd with share_prefix and gradient checkpointing under fsdp: the soft prompt's pass and the
    shared instructions' passes feed later passes only through recorded keys/values, and still reach
    the data-parallel run's student weights and prompt (without their zero-gradient tie to the pass
    output, FSDP runs the last layer's backward on freed weights and the run fails)."""
    common = dict(method="promptkd", share_prefix=True, num_samples=2, gradient_checkpointing=True)
    data_parallel = torchrun(setup, tmp_path, "ddp", **common)
    sharded = torchrun(setup, tmp_path, "fsdp", fsdp=True, **common)
    assert_same(weights(data_parallel), weights(sharded), exact=False)
    prompts = [load_file(os.path.join(run, "final", "prompt", "adapter_model.safetensors"))["prompt_embeddings"]
               for run in (data_parallel, sharded)]
    torch.testing.assert_close(prompts[0], prompts[1], rtol=1e-5, atol=1e-6)
    initial = load_file(os.path.join(setup["student_init"], "model.safetensors"))  # the runs did train
    assert any(not torch.equal(initial[k], v) for k, v in weights(sharded).items())
    lines = [json.loads(x) for x in open(os.path.join(sharded, "metrics.jsonl"))]
    assert lines[-1]["prompt/lr"] > 0


def test_fsdp_shards_each_newer_family_as_data_parallel_trains_it(setup, tmp_path):
    """fsdp: true for a Qwen3, Phi-3, Gemma 2 and Gemma 3 pair (one torchrun launch of 2 processes, gloo, running
    every run in turn): promptkd with shared prefixes and gradient checkpointing, the hardest case of
    test_fsdp_prefix_passes_match_data_parallel, reaches the data-parallel run's student weights and prompt for
    each family. Each family's decoder layers are the FSDP units (its attention, norms and MLP inside them)."""
    import yaml

    script = tmp_path / "runs.py"
    script.write_text(
        "import os, sys\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')  # one group for every run: train() leaves a group it did not make\n"
        "from promptkd.train import TrainConfig, train\n"
        "for path in sys.argv[1:]:\n"
        "    train(TrainConfig.load(path), log=lambda _: None)\n"
        "dist.barrier()\n"
        "sys.stdout.flush(); sys.stderr.flush()\n"
        "os._exit(0)  # FSDP's DTensor caches keep the gloo group alive: no interpreter teardown with it\n")
    common = dict(method="promptkd", share_prefix=True, num_samples=2, gradient_checkpointing=True, batch_size=2,
                  gradient_accumulation=1, max_steps=2, max_new_tokens=4)
    paths, runs = [], {}
    for family in NEWER_FAMILIES:
        pair = family_pair(setup, tmp_path / family, family)
        for mode in ("ddp", "fsdp"):
            cfg = config(setup, tmp_path / family / mode, student=pair["student"], teacher=pair["teacher"],
                         fsdp=mode == "fsdp", **common)
            path = tmp_path / family / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg.to_dict()))
            paths.append(str(path))
            runs[family, mode] = cfg.output_dir
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    for family in NEWER_FAMILIES:
        data_parallel, sharded = runs[family, "ddp"], runs[family, "fsdp"]
        assert_same(weights(data_parallel), weights(sharded), exact=False)
        prompts = [load_file(os.path.join(run, "final", "prompt", "adapter_model.safetensors"))["prompt_embeddings"]
                   for run in (data_parallel, sharded)]
        torch.testing.assert_close(prompts[0], prompts[1], rtol=1e-5, atol=1e-6, msg=family)
        initial = load_file(os.path.join(tmp_path / family / "student", "model.safetensors"))
        assert any(not torch.equal(initial[k], v) for k, v in weights(sharded).items()), family


def test_sampling_streams_differ_per_rank(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path / "run", method="rkl"), log=lambda _: None)
    seeds = set()
    for rank in (0, 1):
        trainer.distill.rank = rank
        seeds |= {trainer.distill.sample_seed(step, micro) for step in range(4) for micro in range(2)}
    assert len(seeds) == 16
