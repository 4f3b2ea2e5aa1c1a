"""A teacher cache of hidden states (cache-teacher --hidden): what it stores equals the teacher's final hidden states
at every counted position (in process and from a vLLM-format pooling server); ``kd`` from it applies the teacher's
head read alone and equals online ``kd`` (float32: to 1e-6; bfloat16: 5e-5, where a row misplaced moves it 5e-4); a
killed and resumed run is byte-identical; every refusal (modes, dtype, temperature, SGLang, a missing or other
teacher, another width)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from test_served import LENGTHS, TINY, serve
from test_served_online import config, losses

from promptkd.cli import main
from promptkd.demo.run import prepare
from promptkd.errors import InputError
from promptkd.served import cache_from_server
from promptkd.train import train
from promptkd.train.teacher_cache import TeacherCache, cache_teacher

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidden")
    return prepare(str(root / "assets"), TINY, seed=7, log=lambda _: None)


def hidden_cache(setup, out, **changes):
    kwargs = dict(hidden=True, batch_size=5, device="cpu", **LENGTHS, **QUIET)
    kwargs.update(changes)
    return cache_teacher(setup["teacher_init"], setup["train"], str(out), **kwargs)


def test_the_cache_holds_the_teachers_hidden_states(setup, tmp_path):
    from promptkd.hf.models import lm_hidden, load_model, load_tokenizer
    from promptkd.train.data import collate, load_examples

    manifest = hidden_cache(setup, tmp_path / "c", dtype="float32")
    cache = TeacherCache(str(tmp_path / "c"))
    assert manifest["mode"] == "hidden" and cache.hidden and cache.k == 32 and manifest["id_dtype"] is None
    assert manifest["dtype"] == "float32"
    tok = load_tokenizer("t", setup["teacher_init"])
    teacher = load_model("teacher", setup["teacher_init"], torch.float32, torch.device("cpu"))
    examples, _ = load_examples(setup["train"], tok, LENGTHS["max_prompt_length"], LENGTHS["max_length"])
    for i in (0, 7, len(examples) - 1):
        e = examples[i]
        batch = collate([e.prompt_ids], [e.response_ids], tok.pad_token_id, tok.eos_token_id)
        with torch.no_grad():
            want = lm_hidden(teacher, batch["input_ids"], batch["attention_mask"]).hidden[batch["labels"] != -100]
        torch.testing.assert_close(cache.example_hidden(i), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="holds hidden states, not targets"):
        cache.example(0)
    default = hidden_cache(setup, tmp_path / "bf16")
    assert default["dtype"] == "bfloat16" and TeacherCache(str(tmp_path / "bf16")).example_hidden(0).dtype == \
        torch.bfloat16
    assert default["bytes"] < manifest["bytes"] * 0.55  # 2 bytes per value, not 4


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 5e-5)])  # measured: 0 and 1.7e-6
def test_kd_from_hidden_states_equals_online_kd(setup, tmp_path, dtype, tol, monkeypatch):
    hidden_cache(setup, tmp_path / "c", dtype=dtype)
    online = losses(train(config(setup, tmp_path, "online", method="kd"), **QUIET))
    import promptkd.train.methods as methods

    loaded, original = [], methods.load_model
    monkeypatch.setattr(methods, "load_model", lambda name, *a, **k: loaded.append(name) or original(name, *a, **k))
    cached = losses(train(config(setup, tmp_path, "cached", method="kd", teacher_cache=str(tmp_path / "c")), **QUIET))
    assert loaded == ["student"]  # the head alone from the teacher's files
    for a, b in zip(cached, online, strict=True):
        assert math.isfinite(a) and abs(a - b) <= tol * max(1.0, abs(b)), (cached, online)


def test_a_served_hidden_cache_equals_the_in_process_one(setup, tmp_path):
    hidden_cache(setup, tmp_path / "local", dtype="float32")
    with serve(setup["teacher_init"], "--runner", "pooling") as (url, _):
        manifest = cache_from_server(url, setup["train"], str(tmp_path / "served"), tokenizer=setup["teacher_init"],
                                     hidden=True, dtype="float32", batch_size=6, concurrency=3, **LENGTHS, **QUIET)
        with pytest.raises(InputError, match="has no scoring route .* is it a pooling server"):
            cache_from_server(url, setup["train"], str(tmp_path / "sc"), tokenizer=setup["teacher_init"], top_k=3,
                              **LENGTHS, **QUIET)
        with pytest.raises(InputError, match="from vLLM's /pooling only"):
            cache_from_server(url, setup["train"], str(tmp_path / "sg"), tokenizer=setup["teacher_init"],
                              hidden=True, api="sglang", **LENGTHS, **QUIET)
    assert manifest["teacher"]["payload"] == "hidden" and manifest["k"] == 32
    local, served = TeacherCache(str(tmp_path / "local")), TeacherCache(str(tmp_path / "served"))
    for i in range(local.num_examples):
        torch.testing.assert_close(served.example_hidden(i), local.example_hidden(i), rtol=1e-5, atol=1e-5)
    # kd from it, the head from the teacher (a served cache records no weights: the width is checked)
    run = losses(train(config(setup, tmp_path, "kd", method="kd", teacher_cache=str(tmp_path / "served")), **QUIET))
    assert len(run) == 2 and all(math.isfinite(x) for x in run)
    with serve(setup["teacher_init"]) as (url, _):
        with pytest.raises(InputError, match="has no /pooling .* --hidden needs"):
            cache_from_server(url, setup["train"], str(tmp_path / "np"), tokenizer=setup["teacher_init"], hidden=True,
                              **LENGTHS, **QUIET)
    with pytest.raises(InputError, match="holds hidden states of width 32"):
        train(config(setup, tmp_path, "w", method="kd", teacher=setup["student_init"],
                     teacher_cache=str(tmp_path / "served")), **QUIET)


def test_killed_and_resumed_is_byte_identical(setup, tmp_path):
    whole = tmp_path / "whole"
    hidden_cache(setup, whole, shard_mb=0.002)
    stopped = tmp_path / "stopped"

    class Stop(Exception):
        pass

    def stop(batch):
        if batch == 2:
            raise Stop

    with pytest.raises(Stop):
        hidden_cache(setup, stopped, shard_mb=0.002, on_batch=stop)
    assert not (stopped / "manifest.json").exists()
    hidden_cache(setup, stopped, shard_mb=0.002, resume=True)
    names = sorted(n for n in os.listdir(whole) if n.startswith("shard-"))
    assert len(names) > 2 and names == sorted(n for n in os.listdir(stopped) if n.startswith("shard-"))
    assert all((whole / n).read_bytes() == (stopped / n).read_bytes() for n in names)


def test_refusals(setup, tmp_path, capsys):
    def refused(match, **changes):
        with pytest.raises(InputError, match=match):
            hidden_cache(setup, tmp_path / "r", **changes)

    refused("exactly one of .* got top_k and hidden", top_k=4)
    refused("exactly one of .* got samples and hidden", samples=4)
    refused("hidden states hold no temperature", temperature=2.0)
    refused(r"dtype must be one of \('bfloat16', 'float32'\) for stored hidden states", dtype="float16")
    with pytest.raises(InputError, match=r"dtype must be one of \('float16', 'float32'\)"):
        cache_teacher(setup["teacher_init"], setup["train"], str(tmp_path / "r"), top_k=3, dtype="bfloat16",
                      **LENGTHS, **QUIET)
    hidden_cache(setup, tmp_path / "c")
    with pytest.raises(InputError, match="set teacher= the teacher's weights"):
        train(config(setup, tmp_path, "t", method="kd", teacher="", teacher_cache=str(tmp_path / "c")), **QUIET)
    with pytest.raises(InputError, match="has other weights"):
        train(config(setup, tmp_path, "t", method="kd", teacher=setup["student_init"],
                     teacher_cache=str(tmp_path / "c")), **QUIET)
    # the command line
    code = main(["cache-teacher", "--teacher", setup["teacher_init"], "--data", setup["train"], "--out",
                 str(tmp_path / "cli"), "--hidden", "--max-length", "200", "--max-prompt-length", "180"])
    assert code == 0 and json.loads(Path(tmp_path / "cli" / "manifest.json").read_text())["mode"] == "hidden"
    assert main(["cache-teacher", "--teacher", setup["teacher_init"], "--data", setup["train"], "--out",
                 str(tmp_path / "cli2"), "--hidden", "--top-k", "3"]) == 2
    assert "exactly one of --top-k" in capsys.readouterr().err
