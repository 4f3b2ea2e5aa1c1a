"""PromptKD's prompt diagnostics (``prompt/*`` at validation) against float64 evaluations of their formulas, and
``prompt_frozen``, the ablation that keeps the soft prompt at its initialisation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from promptkd.demo.run import DemoSettings, prepare
from promptkd.errors import InputError
from promptkd.train import TrainConfig, Trainer, train
from promptkd.train.data import collate
from promptkd.train.diagnostics import KEYS, prompt_diagnostics
from promptkd.train.evaluate import evaluate

TINY = DemoSettings(n_train=24, n_valid=5, n_test=4, vocab_size=300, teacher=(32, 2, 2, 64), student=(16, 1, 2, 32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnostics")
    paths = prepare(str(root / "assets"), TINY, seed=4, log=lambda _: None)
    # The untrained teacher is nearly uniform and barely moved by a prompt, where KL(a || b) and KL(b || a) agree
    # to 1e-5: its matrices scaled by 6 make it sharp enough that the two directions differ (by 7e-3 relative).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(paths["teacher_init"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    paths["sharp_teacher"] = str(root / "sharp")
    model.save_pretrained(paths["sharp_teacher"])
    AutoTokenizer.from_pretrained(paths["teacher_init"]).save_pretrained(paths["sharp_teacher"])
    return paths


def config(paths, out, **changes) -> TrainConfig:
    values = dict(method="promptkd", student=paths["student_init"], teacher=paths["teacher_init"],
                  train_file=paths["train"], valid_file=paths["valid"], output_dir=str(out), max_length=200,
                  max_prompt_length=180, batch_size=4, max_steps=3, lr=1e-3, prompt_lr=0.05, warmup_steps=0,
                  max_new_tokens=6, eval_max_new_tokens=4, eval_interval=3, eval_batch_size=2, progress=False,
                  tensorboard=False, loss_impl="torch", attention_impl="torch", device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def test_the_diagnostics_are_their_formulas(setup, tmp_path):
    """Each prompt/* value against HF logits in float64 on the validation references (batches of 2, so the token
    weighting across batches is checked too), after the prompt has moved."""
    trainer = Trainer(config(setup, tmp_path / "run", teacher=setup["sharp_teacher"]), log=lambda _: None)
    with torch.no_grad():
        trainer.prompted.soft_prompt.add_(3.0 * torch.randn(trainer.prompted.soft_prompt.shape,
                                                            generator=torch.Generator().manual_seed(0)))
    examples, tok = trainer.valid_examples, trainer.tokenizer
    got = prompt_diagnostics(trainer.distill, examples, tok, seeds=(10, 20), max_new_tokens=4, batch_size=2)
    assert set(got) == set(KEYS)

    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tok.pad_token_id,
                    tok.eos_token_id)
    counted = batch["labels"] != -100
    ids, mask, prompted = batch["input_ids"], batch["attention_mask"], trainer.prompted
    with torch.no_grad():
        q = torch.log_softmax(trainer.student(input_ids=ids, attention_mask=mask).logits.double(), -1)[counted]
        tp = torch.log_softmax(prompted(ids, mask, return_logits=True).logits.double(), -1)[counted]
        t = torch.log_softmax(prompted(ids, mask, use_prompt=False, return_logits=True).logits.double(), -1)[counted]
    labels = batch["labels"][counted]

    def kl(log_p, log_q):
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    p, p0 = prompted.soft_prompt.detach().double(), prompted.initial_prompt.double()
    expected = {"prompt/kl_student_prompted": kl(q, tp), "prompt/kl_student_plain": kl(q, t),
                "prompt/kl_prompted_plain": kl(tp, t),
                "prompt/teacher_ce": float(-tp.gather(-1, labels[:, None]).mean()),
                "prompt/distance": float((p - p0).norm() / p0.norm())}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert got["prompt/kl_student_prompted"] != pytest.approx(got["prompt/kl_student_plain"], rel=1e-2)
    assert kl(tp, t) != pytest.approx(kl(t, tp), rel=1e-3)  # the direction is checked
    items = [{"prompt": e.prompt, "references": e.references} for e in examples]
    assert got["prompt/teacher_rougeL"] == evaluate(prompted, tok, items, seeds=(10, 20), max_new_tokens=4,
                                                    batch_size=2)["rougeL"]
    assert trainer.student.training  # modes restored


def test_a_run_logs_and_plots_them(setup, tmp_path):
    run_dir = train(config(setup, tmp_path / "run"), log=lambda _: None)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert not any(k.startswith("prompt/kl") for k in lines[0])  # validation only
    assert set(KEYS) <= set(lines[-1]) and lines[-1]["prompt/distance"] > 0
    assert "prompt/grad_norm" in lines[0]
    assert os.path.getsize(os.path.join(run_dir, "plots", "prompt_diagnostics.png")) > 1000


def test_a_frozen_prompt_stays_at_its_initialisation(setup, tmp_path, monkeypatch):
    """prompt_frozen: no prompt step runs (no prompt optimizer), the saved prompt is the initial one, and the
    student's first loss is KL(q || p_TP) with the initial prompt on the first step's samples."""
    from promptkd.train.methods import Distillation

    cfg = config(setup, tmp_path / "frozen", prompt_frozen=True)
    reference = Trainer(cfg.replace(output_dir=str(tmp_path / "reference")), log=lambda _: None)
    examples = [reference.train_examples[i] for i in reference.order.micro_batches(0, 0)[0]]
    batch, _ = reference.distill.batch(*reference.distill.on_policy(examples, 0, 0))
    with torch.no_grad():
        first = float(reference.distill.student_loss(batch))

    def refuse(*args, **kwargs):
        raise AssertionError("a frozen prompt ran the prompt step")

    monkeypatch.setattr(Distillation, "prompt_loss", refuse)
    trainer = Trainer(cfg, log=lambda _: None)
    assert trainer.prompt_optimizer is None and not trainer.prompted.soft_prompt.requires_grad
    run_dir = trainer.train()
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert lines[0]["train/loss"] == pytest.approx(first, rel=1e-6)
    assert not any("prompt/loss" in x for x in lines) and lines[-1]["prompt/distance"] == 0.0
    saved = load_file(os.path.join(run_dir, "final", "prompt", "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(saved, trainer.prompted.initial_prompt)
    start = load_file(os.path.join(setup["student_init"], "model.safetensors"))
    end = load_file(os.path.join(run_dir, "final", "model", "model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_prompt_frozen_is_refused_elsewhere_and_on_a_changed_resume(setup, tmp_path):
    with pytest.raises(InputError, match="prompt_frozen applies to method 'promptkd'"):
        config(setup, tmp_path / "x", method="rkl", prompt_frozen=True)
    with pytest.raises(InputError, match="prompt_frozen must be true or false"):
        config(setup, tmp_path / "x", prompt_frozen="yes")
    cfg = config(setup, tmp_path / "run", max_steps=1, valid_file="")
    train(cfg, log=lambda _: None)
    with pytest.raises(InputError, match="prompt_frozen"):
        Trainer(cfg.replace(max_steps=2, prompt_frozen=True), resume=True, log=lambda _: None)
