"""The teacher cache (``promptkd cache-teacher``, ``teacher_cache=DIR``): what it stores is fused_linear_topk of the
teacher's hidden states (top-k and sampled, uint16 and int32 ids, float16 and float32 log-probabilities), sampled
targets do not depend on the batching, a SIGKILLed run resumes byte-identical, damaged shards are recomputed or
refused, nothing is overwritten unless asked, a second writer is refused; ``kd`` from a full-vocabulary top-k cache
trains as online ``kd`` without loading the teacher, resumes bit-identical, and runs under torchrun.

Models are the tiny Llama-style configs of tests/test_trainer.py (``promptkd.demo.run.prepare``), plus a teacher
whose output layer has 70000 rows (int32 ids).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_decoder

from promptkd import fused_linear_topk
from promptkd.cli import main
from promptkd.demo.run import DemoSettings, prepare
from promptkd.errors import InputError
from promptkd.hf.models import lm_hidden, load_model, load_tokenizer
from promptkd.sparse.philox import philox
from promptkd.train import TrainConfig, Trainer, train
from promptkd.train.data import collate, load_examples
from promptkd.train.teacher_cache import (
    MANIFEST,
    TeacherCache,
    cache_teacher,
    decode_ids,
    encode_ids,
    lock_path,
    row_keys,
)

TINY = DemoSettings(n_train=48, n_valid=6, n_test=6, vocab_size=300, teacher=(32, 2, 2, 64), student=(16, 1, 2, 32))
LENGTHS = dict(max_length=200, max_prompt_length=180)
QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cache")
    paths = prepare(str(root / "assets"), TINY, seed=3, log=lambda _: None)
    # A teacher whose output layer has more rows than uint16 ids can name (its tokenizer has 300 tokens).
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher_init"])
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=70000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=256,
                                        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    paths["wide"] = str(root / "assets" / "wide")
    wide.save_pretrained(paths["wide"])
    tokenizer.save_pretrained(paths["wide"])
    return paths


def make_cache(setup, out, teacher=None, **settings) -> dict:
    values = dict(LENGTHS, batch_size=4, shard_mb=0.002, device="cpu", **QUIET)
    values.update(settings)
    return cache_teacher(teacher or setup["teacher_init"], setup["train"], str(out), **values)


def expected_targets(setup, teacher, batch_size, k, samples=0, temperature=1.0, seed=0):
    """fused_linear_topk of the teacher's hidden states at every example's counted positions, batch by batch as
    the trainer collates them; sampled rows keyed as the module docstring says, straight from Philox."""
    tokenizer = load_tokenizer("teacher", teacher)
    model = load_model("teacher", teacher, torch.float32, torch.device("cpu")).eval()
    examples, _ = load_examples(setup["train"], tokenizer, **{k_: LENGTHS[k_] for k_ in ("max_prompt_length",
                                                                                          "max_length")})
    out = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], tokenizer.pad_token_id,
                        tokenizer.eos_token_id)
        counted = batch["labels"] != -100
        with torch.no_grad():
            h = lm_hidden(model, batch["input_ids"], batch["attention_mask"])
        rows = h.hidden[counted]  # the batch's counted rows, example by example, as the cache runs them
        keys = None
        if samples:
            owner = torch.tensor([e.index for e in chunk])[:, None].expand_as(counted)[counted]
            position = (counted.cumsum(1) - 1)[counted]
            w0, w1, _, _ = philox(torch.full_like(owner, seed), owner & 0xFFFFFFFF, owner >> 32, position,
                                  torch.full_like(owner, 0x6B64726B))
            keys = (w1 << 32) | w0  # the int64 bits of the uint64 key
        targets = fused_linear_topk(rows, h.weight, k, bias=h.bias, temperature=temperature, samples=samples,
                                    seed=keys)
        counts = counted.sum(1).tolist()
        out.extend(zip(targets.ids.split(counts), targets.logprobs.split(counts), strict=True))
    return out


# ---------------------------------------------------------------- what is stored


def test_id_encodings_round_trip():
    ids = torch.tensor([[-1, 0, 1, 65534], [300, -1, -1, 7]])
    stored = encode_ids(ids, "uint16")
    assert stored.dtype == torch.uint16
    assert stored.to(torch.int32).tolist() == [[65535, 0, 1, 65534], [300, 65535, 65535, 7]]
    assert torch.equal(decode_ids(stored), ids)
    wide = torch.tensor([[-1, 69999, 65535, 0]])
    assert encode_ids(wide, "int32").dtype == torch.int32
    assert torch.equal(decode_ids(encode_ids(wide, "int32")), wide)
    # What torch 2.13 itself does with the casts (why the encoding maps -1 and 65535 explicitly): the bits wrap
    # one way, but uint16 65535 widens to 65535, not -1.
    assert torch.tensor([-1]).to(torch.uint16).to(torch.int32).item() == 65535
    assert torch.tensor([65535], dtype=torch.int32).to(torch.uint16).to(torch.int64).item() == 65535


# Low temperatures make the untrained teachers' draws repeat, so sampled rows hold padding.
CASES = {"topk-uint16-float32": dict(top_k=5, dtype="float32"), "topk-uint16-float16": dict(top_k=5),
         "samples-uint16-float16": dict(samples=6, temperature=0.1, seed=11),
         "samples-uint16-float32": dict(samples=6, dtype="float32", temperature=0.2, seed=2**40 + 3),
         "topk-int32-float16": dict(top_k=4, teacher="wide"),
         "samples-int32-float32": dict(samples=3, dtype="float32", temperature=0.002, teacher="wide")}


@pytest.mark.parametrize("case", CASES)
def test_cache_holds_the_teachers_targets(setup, tmp_path, case):
    settings = dict(CASES[case])
    teacher = setup[settings.pop("teacher", "teacher_init")]
    manifest = make_cache(setup, tmp_path / "cache", teacher=teacher, **settings)
    k = settings.get("top_k") or settings["samples"]
    expected = expected_targets(setup, teacher, 4, k, settings.get("samples", 0), settings.get("temperature", 1.0),
                                settings.get("seed", 0))
    cache = TeacherCache(str(tmp_path / "cache"))
    float16 = settings.get("dtype", "float16") == "float16"
    assert manifest["id_dtype"] == ("int32" if "int32" in case else "uint16") and len(manifest["shards"]) > 2
    assert (cache.k, cache.tail, cache.num_examples) == (k, "topk" in case, len(expected))
    assert manifest["num_tokens"] == sum(ids.shape[0] for ids, _ in expected)
    for i, (want_ids, want_logprobs) in enumerate(expected):
        ids, logprobs = cache.example(i)
        assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
        assert torch.equal(ids, want_ids), i
        want = want_logprobs.half().float() if float16 else want_logprobs
        assert torch.equal(logprobs, want), i  # bit for bit: float32 exact, float16 its rounding
    if "samples" in case:  # padding slots come back as -1 / -inf
        every = [cache.example(i) for i in range(cache.num_examples)]
        assert (torch.cat([ids for ids, _ in every]) == -1).any()
        assert all(torch.equal(ids == -1, lp == float("-inf")) for ids, lp in every)
    # On disk: the documented tensors and dtypes, padding as 65535 (uint16) or -1 (int32) with -inf.
    shard = load_file(os.path.join(tmp_path / "cache", manifest["shards"][1]["file"]))
    assert shard["ids"].dtype == (torch.int32 if "int32" in case else torch.uint16)
    assert shard["logprobs"].dtype == (torch.float16 if float16 else torch.float32)
    start, end = manifest["shards"][1]["examples"]
    assert shard["offsets"].tolist() == [0, *torch.tensor([expected[i][0].shape[0]
                                                           for i in range(start, end)]).cumsum(0).tolist()]
    empty = shard["logprobs"] == float("-inf")
    assert torch.equal(empty, shard["ids"].to(torch.int64) == (-1 if "int32" in case else 65535))


def test_row_keys_are_the_documented_philox_words():
    examples, positions = torch.tensor([0, 5, 2**33 + 1]), torch.tensor([0, 3, 7])
    w0, w1, _, _ = philox(torch.full((3,), 99), examples & 0xFFFFFFFF, examples >> 32, positions,
                          torch.full((3,), 0x6B64726B))
    assert torch.equal(row_keys(99, examples, positions), (w1 << 32) | w0)
    assert len(set(row_keys(99, torch.zeros(1000, dtype=torch.int64), torch.arange(1000)).tolist())) == 1000


def test_batch_targets_place_rows_at_counted_positions(setup, tmp_path):
    make_cache(setup, tmp_path / "cache", top_k=3)
    cache = TeacherCache(str(tmp_path / "cache"))
    tokenizer = load_tokenizer("teacher", setup["teacher_init"])
    examples, _ = load_examples(setup["train"], tokenizer, 180, 200)
    picked = [examples[i] for i in (7, 0, 30)]
    labels = collate([e.prompt_ids for e in picked], [e.response_ids for e in picked], tokenizer.pad_token_id,
                     tokenizer.eos_token_id)["labels"]
    ids, logprobs = cache.batch_targets([e.index for e in picked], labels)
    assert ids.shape == (*labels.shape, 3) and logprobs.dtype == torch.float32
    for b, e in enumerate(picked):
        counted = labels[b] != -100
        assert torch.equal(ids[b][counted], cache.example(e.index)[0])
        assert (ids[b][~counted] == -1).all() and (logprobs[b][~counted] == float("-inf")).all()
    with pytest.raises(InputError, match="example 0: the cache holds .* target rows, the batch counts"):
        cache.batch_targets([0, 7, 30], labels)


def test_sampled_targets_do_not_depend_on_the_batching(setup, tmp_path):
    caches = []
    for batch_size in (2, 3):
        make_cache(setup, tmp_path / f"b{batch_size}", samples=8, seed=5, batch_size=batch_size)
        caches.append(TeacherCache(str(tmp_path / f"b{batch_size}")))
    for i in range(caches[0].num_examples):
        a, b = caches[0].example(i), caches[1].example(i)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), i
    first_rows = {tuple(caches[0].example(i)[0][0].tolist()) for i in range(caches[0].num_examples)}
    assert len(first_rows) > 10  # the rows do not all draw alike


# ---------------------------------------------------------------- kills, damage, refusals


KILLER = textwrap.dedent("""
    import os, signal, sys
    from promptkd.train.teacher_cache import cache_teacher

    def kill(batch):
        if batch == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)

    cache_teacher(sys.argv[1], sys.argv[2], sys.argv[3], top_k=6, max_length=200, max_prompt_length=180,
                  batch_size=4, shard_mb=0.002, device="cpu", log=lambda _: None, on_batch=kill)
""")


def _shard_bytes(out) -> dict:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.startswith("shard-")}


def _manifest_without_timing(out) -> dict:
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    manifest.pop("measured")
    return manifest


def test_a_killed_run_resumes_byte_identical_and_damage_is_repaired(setup, tmp_path):
    full = make_cache(setup, tmp_path / "full", top_k=6)
    starts = [s["examples"][0] // 4 for s in full["shards"]]  # the first batch of each shard
    assert len(starts) > 3 and starts[3] - starts[2] > 1  # several shards, of several batches
    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed_at = starts[2]  # in the third shard's first batch: two shards complete, the third pending
    result = subprocess.run([sys.executable, str(script), setup["teacher_init"], setup["train"], str(out),
                             str(killed_at)], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    progress = json.load(open(out / "progress-rank0.json"))
    assert progress["shards"] == full["shards"][:2]
    assert not (out / MANIFEST).exists()
    with pytest.raises(InputError, match="is incomplete .* --resume"):
        TeacherCache(str(out))
    with pytest.raises(InputError, match="holds an incomplete teacher cache .* pass --resume"):
        make_cache(setup, out, top_k=6)
    computed = []
    make_cache(setup, out, top_k=6, resume=True, on_batch=computed.append)
    assert computed == list(range(killed_at, 12))  # nothing it had was computed again
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "full")
    assert _manifest_without_timing(out) == _manifest_without_timing(tmp_path / "full")

    # A truncated shard and a temporary file a kill left while writing: the reader refuses the shard by name;
    # a resume removes the temporary file and recomputes that shard only.
    second = full["shards"][1]["file"]
    with open(out / second, "r+b") as f:
        f.truncate(full["shards"][1]["bytes"] - 10)
    (out / f".{second}.k3x9q2.tmp").write_bytes(b"partial")
    with pytest.raises(InputError, match=f"shard {second} is truncated"):
        TeacherCache(str(out))
    computed.clear()
    make_cache(setup, out, top_k=6, resume=True, on_batch=computed.append)
    assert computed == list(range(starts[1], starts[2]))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "full")
    assert _manifest_without_timing(out) == _manifest_without_timing(tmp_path / "full")
    # The same size, one byte changed: corrupt, refused by name (its sha256), then repaired the same way.
    data = bytearray((out / second).read_bytes())
    data[-3] ^= 0xFF
    (out / second).write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"shard {second} is corrupt"):
        TeacherCache(str(out))
    TeacherCache(str(out), verify=False)  # sizes only
    make_cache(setup, out, top_k=6, resume=True)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "full")
    computed.clear()
    make_cache(setup, out, top_k=6, resume=True, on_batch=computed.append)  # complete and intact: nothing to do
    assert computed == []


def test_nothing_is_overwritten_unless_asked(setup, tmp_path):
    out = tmp_path / "cache"
    make_cache(setup, out, top_k=4)
    before = _shard_bytes(out)
    with pytest.raises(InputError, match="holds a complete teacher cache .* pass --overwrite"):
        make_cache(setup, out, top_k=4)
    with pytest.raises(InputError, match="exclude each other"):
        make_cache(setup, out, top_k=4, resume=True, overwrite=True)
    changed = r"\(k: 4 -> 5; temperature: 1.0 -> 2.0; batch_size: 4 -> 3\)"
    with pytest.raises(InputError, match=r"the settings differ .*" + changed):
        make_cache(setup, out, top_k=5, temperature=2.0, batch_size=3, resume=True)
    with pytest.raises(InputError, match=r"the settings differ .*\(mode: 'top_k' -> 'samples'; samples: None -> 4\)"):
        make_cache(setup, out, samples=4, resume=True)
    other = tmp_path / "other.jsonl"
    lines = open(setup["train"]).readlines()
    other.write_text("".join(lines[1:] + lines[:1]))
    with pytest.raises(InputError, match=r"the settings differ .*\(data_sha256: "):
        cache_teacher(setup["teacher_init"], str(other), str(out), top_k=4, resume=True, **LENGTHS, batch_size=4,
                      shard_mb=0.002, device="cpu", **QUIET)
    assert _shard_bytes(out) == before
    with pytest.raises(InputError, match="holds no cache run to continue"):
        make_cache(setup, tmp_path / "nothing", top_k=4, resume=True)
    # overwrite removes the cache's own files and nothing else.
    (out / "notes.txt").write_text("mine")
    manifest = make_cache(setup, out, samples=4, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and manifest["mode"] == "samples"
    assert all(n.startswith("shard-000-") for n in _shard_bytes(out)) and _shard_bytes(out) != before
    # An interrupted run is incomplete to the reader; a directory without any cache is no cache.
    def stop(batch):
        if batch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_cache(setup, tmp_path / "partial", top_k=4, on_batch=stop)
    with pytest.raises(InputError, match="is incomplete .* same `promptkd cache-teacher` command with --resume"):
        TeacherCache(str(tmp_path / "partial"))
    with pytest.raises(InputError, match="is not a teacher cache"):
        TeacherCache(str(tmp_path))
    with pytest.raises(InputError, match="give exactly one of top_k .* and samples"):
        make_cache(setup, tmp_path / "x", top_k=2, samples=2)


def _cli(setup, out, *extra) -> list[str]:
    return ["cache-teacher", "--teacher", setup["teacher_init"], "--data", setup["train"], "--out", str(out),
            "--max-length", "200", "--max-prompt-length", "180", "--batch-size", "4", "--shard-mb", "0.002",
            "--device", "cpu", *extra]


def test_a_second_writer_is_refused(setup, tmp_path):
    """The lock held (here by the test process), ``promptkd cache-teacher`` in another process refuses to write."""
    out = tmp_path / "cache"
    out.mkdir()
    with open(lock_path(str(out), 0), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = subprocess.run([sys.executable, "-m", "promptkd.cli", *_cli(setup, out, "--top-k", "3")],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another process is writing the cache" in lines[0], lines
    assert os.listdir(out) == ["lock-rank0"]


def test_cli_writes_a_cache_and_refuses_bad_arguments(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cache"
    assert main(_cli(setup, out, "--samples", "5", "--seed", "3", "--dtype", "float32")) == 0
    assert "examples/s" in capsys.readouterr().out
    cache = TeacherCache(str(out))
    assert (cache.k, cache.tail, cache.manifest["seed"], cache.manifest["dtype"]) == (5, False, 3, "float32")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr("promptkd.hf.models.load_tokenizer", no_loading)
    monkeypatch.setattr("promptkd.hf.models.load_model", no_loading)
    file = tmp_path / "file"
    file.write_text("")
    bad = {("--top-k", "0"): "--top-k must be >= 1, got 0",
           ("--top-k", "2", "--samples", "2"): "give exactly one of --top-k .* and --samples",
           (): "give exactly one of --top-k",
           ("--top-k", "2", "--max-prompt-length", "250"): r"--max-prompt-length \(250\) must be < --max-length",
           ("--top-k", "2", "--dtype", "bfloat16"): "--dtype must be one of",
           ("--top-k", "2", "--shard-mb", "0"): "--shard-mb must be a finite number > 0",
           ("--top-k", "2", "--temperature", "nan"): "--temperature must be a finite number > 0",
           ("--top-k", "2", "--seed", "-1"): "--seed must be in",
           ("--top-k", "2", "--device", "tpu"): "device must be 'auto', 'cpu', 'cuda'",
           ("--top-k", "2", "--tokenizer", str(tmp_path / "none")): "--tokenizer: model path .* does not exist"}
    for extra, message in bad.items():
        assert main(_cli(setup, tmp_path / "new", *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("promptkd cache-teacher: error: "), err
        assert re.search(message, err[0]), (message, err[0])
    assert main(_cli(setup, file, "--top-k", "2")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    args = _cli(setup, out, "--top-k", "2")
    args[args.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert main(args) == 2
    assert "--data: no file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")


# ---------------------------------------------------------------- training from the cache


def config(setup, out, **changes) -> TrainConfig:
    values = dict(method="kd", student=setup["student_init"], teacher=setup["teacher_init"], train_file=setup["train"],
                  valid_file="", output_dir=str(out), batch_size=4, max_steps=3, lr=1e-3, warmup_steps=1,
                  progress=False, tensorboard=False, loss_impl="torch", attention_impl="torch", device="cpu", **LENGTHS)
    values.update(changes)
    return TrainConfig(**values)


def weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "final", "model", "model.safetensors"))


def losses(run_dir) -> list[float]:
    return [json.loads(x)["train/loss"] for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def full_cache(setup, tmp_path_factory):
    """Top-k over the whole vocabulary in float32: the sparse loss with tail=True is then the full forward KL."""
    out = tmp_path_factory.mktemp("full") / "cache"
    make_cache(setup, out, top_k=300, dtype="float32", shard_mb=0.5)
    return str(out)


def test_kd_from_a_full_cache_of_a_capped_gemma2_pair_is_online_kd(setup, tmp_path):
    """Gemma 2 caps its final logits: the cache holds the targets of the teacher's capped logits (the cap read
    from its config and recorded in the manifest), and kd from it applies the student's cap, so that with every
    token of the vocabulary cached (top-k = V, float32) the run's losses and weights are online kd's on the
    models' own logits. Tight caps, so that either one missing changes the losses."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["student_init"])
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512, sliding_window=512,
                   initializer_range=0.5)
    pair = {}
    for name, hidden, cap in (("teacher", 32, 0.5), ("student", 16, 0.8)):
        pair[name] = str(tmp_path / name)
        tiny_decoder("gemma2", hidden=hidden, final_logit_softcapping=cap, **special).save_pretrained(pair[name])
        tokenizer.save_pretrained(pair[name])
    manifest = make_cache(setup, tmp_path / "cache", teacher=pair["teacher"], top_k=len(tokenizer), dtype="float32")
    assert manifest["teacher_logit_transform"] == {"logit_scale": 1.0, "softcap": 0.5}
    online = train(config(setup, tmp_path / "online", student=pair["student"], teacher=pair["teacher"],
                          max_steps=3), **QUIET)
    cached = train(config(setup, tmp_path / "cached", student=pair["student"], teacher=str(tmp_path / "no_teacher"),
                          teacher_cache=str(tmp_path / "cache"), max_steps=3), **QUIET)
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(online)), rtol=1e-5, atol=1e-6)
    a, b = weights(online), weights(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kd_from_a_full_cache_trains_as_online_kd_without_the_teacher(setup, tmp_path, full_cache, monkeypatch):
    online = train(config(setup, tmp_path / "online", max_steps=4), **QUIET)
    original = load_model

    def student_only(name, *args, **kwargs):
        assert name != "teacher", "the teacher was loaded"
        return original(name, *args, **kwargs)

    monkeypatch.setattr("promptkd.train.methods.load_model", student_only)
    cached = train(config(setup, tmp_path / "cached", max_steps=4, teacher=str(tmp_path / "no_teacher"),
                          teacher_cache=full_cache), **QUIET)
    torch.testing.assert_close(torch.tensor(losses(cached)), torch.tensor(losses(online)), rtol=1e-5, atol=1e-6)
    a, b = weights(online), weights(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["top_k", "samples"])
def test_a_kd_step_from_a_cache_is_the_sparse_loss_on_its_targets(setup, tmp_path, mode):
    """The trainer's kd loss from a cache: the sparse loss on the batch's cached targets with the cache's tail
    rule (top-k: tail bucket; samples: renormalised) and temperature, kd_ratio / 1 - kd_ratio as the weights."""
    from promptkd import fused_linear_sparse_kd_loss

    make_cache(setup, tmp_path / "cache", temperature=2.0, **{mode: 8})
    trainer = Trainer(config(setup, tmp_path / "run", teacher="", teacher_cache=str(tmp_path / "cache"),
                             kd_ratio=0.7), **QUIET)
    examples = [trainer.train_examples[i] for i in trainer.order.micro_batches(1, 0)[0]]
    loss, _ = trainer.distill.micro_loss(examples, 1, 0)
    batch, _ = trainer.distill.batch(*trainer.distill.ground_truth(examples))
    student = trainer.distill.student(batch)
    ids, logprobs = trainer.cache.batch_targets([e.index for e in examples], batch["labels"])
    expected = fused_linear_sparse_kd_loss(student.hidden, student.weight, ids, logprobs, batch["labels"],
                                           tail=mode == "top_k", temperature=2.0, soft_weight=0.7, hard_weight=0.3,
                                           impl="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(loss, fused_linear_sparse_kd_loss(
        student.hidden, student.weight, ids, logprobs, batch["labels"], tail=mode != "top_k", temperature=2.0,
        soft_weight=0.7, hard_weight=0.3), rtol=1e-4)  # the tail rule matters at k=8
    trainer.close()


def test_resume_from_a_cache_is_bit_identical_and_needs_the_same_cache(setup, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    make_cache(setup, cache_dir, top_k=8)  # float16 log-probabilities
    base = dict(teacher="", teacher_cache=str(cache_dir), max_steps=4, save_interval=2, batch_size=2,
                gradient_accumulation=2)
    full = train(config(setup, tmp_path / "full", **base), **QUIET)
    original = Trainer._step

    def crashing(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "_step", crashing)
    cut = config(setup, tmp_path / "cut", **base)
    with pytest.raises(KeyboardInterrupt):
        train(cut, **QUIET)
    monkeypatch.setattr(Trainer, "_step", original)
    train(cut, resume=True, **QUIET)
    a, b = weights(full), weights(cut.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(cut.output_dir)
    state = json.load(open(os.path.join(cut.output_dir, "checkpoint-0000004", "trainer_state.json")))
    assert state["step"] == 4
    assert state["teacher_cache_sha256"] == TeacherCache(str(cache_dir)).digest

    # Another directory (a copy of the same cache) is refused as a changed setting; the same directory rewritten
    # with other targets by its digest.
    shutil.copytree(cache_dir, tmp_path / "elsewhere")
    make_cache(setup, cache_dir, top_k=8, temperature=2.0, overwrite=True)
    with pytest.raises(InputError, match="--resume: teacher_cache .* is not the cache .* was trained from"):
        Trainer(cut.replace(max_steps=5), resume=True, **QUIET)
    with pytest.raises(InputError, match=r"settings that would change the run \(teacher_cache: "):
        Trainer(cut.replace(max_steps=5, teacher_cache=str(tmp_path / "elsewhere")), resume=True, **QUIET)


@pytest.mark.parametrize("mismatch", ["tokenizer", "train_file", "max_length", "corrupt_shard"])
def test_the_trainer_refuses_a_cache_of_other_inputs(setup, tmp_path, monkeypatch, mismatch):
    cache_dir = tmp_path / "cache"
    manifest = make_cache(setup, cache_dir, top_k=4)
    changes, expected = {}, ""
    if mismatch == "tokenizer":
        from promptkd.demo.tokenizer import train_tokenizer

        other = tmp_path / "other_tokenizer"
        train_tokenizer(["completely different text " * 20, "zebra quartz"], vocab_size=300).save_pretrained(other)
        shutil.copy(os.path.join(setup["student_init"], "config.json"), other)
        changes, expected = dict(tokenizer=str(other)), "was written with another tokenizer"
    elif mismatch == "train_file":
        other = tmp_path / "train.jsonl"
        lines = open(setup["train"]).readlines()
        other.write_text("".join(lines[::-1]))  # the same records in another order
        changes, expected = dict(train_file=str(other)), "was written for other training data: train_file"
    elif mismatch == "max_length":
        changes, expected = dict(max_length=190), "was written with max_length=200, this run has max_length=190"
    else:
        path = cache_dir / manifest["shards"][2]["file"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        expected = f"shard {manifest['shards'][2]['file']} is corrupt"

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the cache was checked")

    monkeypatch.setattr("promptkd.train.methods.load_model", no_loading)
    with pytest.raises(InputError, match=expected):
        Trainer(config(setup, tmp_path / "run", teacher_cache=str(cache_dir), **changes), **QUIET)


def test_teacher_cache_is_a_config_key():
    cfg = TrainConfig.load("gpt2-xl_to_gpt2-base", ["method=kd", "teacher=", "teacher_cache=caches/gpt2-xl"])
    assert cfg.teacher_cache == "caches/gpt2-xl"
    cfg.replace(student="s", train_file="t").check_ready()  # no teacher needed
    with pytest.raises(InputError, match="method 'kd' needs teacher"):
        cfg.replace(student="s", train_file="t", teacher_cache="").check_ready()
    with pytest.raises(TypeError, match="teacher_cache must be a string"):
        TrainConfig(method="kd", teacher_cache=3)


@pytest.mark.parametrize("method", ["rkl", "gkd", "distillm", "promptkd", "sft"])
def test_a_teacher_cache_serves_kd_only(method):
    why = "sft uses no teacher" if method == "sft" else f"{method} samples responses from the student .* needs the " \
                                                        "teacher online"
    with pytest.raises(InputError, match=f"teacher_cache applies to method 'kd' only, not '{method}': {why}"):
        TrainConfig(method=method, teacher_cache="somewhere")


# ---------------------------------------------------------------- several processes


def torchrun(*program, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr and "ProcessGroupLeak" not in result.stderr, result.stderr[-4000:]
    return result


def test_torchrun_caches_what_one_process_caches(setup, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same GEMM blocking
    try:
        single = make_cache(setup, tmp_path / "single", top_k=5, dtype="float32", batch_size=3)
    finally:
        torch.set_num_threads(threads)
    torchrun("-m", "promptkd.cli", *_cli(setup, tmp_path / "two", "--top-k", "5", "--dtype", "float32",
                                         "--batch-size", "3"))
    one, two = TeacherCache(str(tmp_path / "single")), TeacherCache(str(tmp_path / "two"))
    assert two.manifest["processes"] == 2 and {s["file"][:9] for s in two.shards} == {"shard-000", "shard-001"}
    assert two.manifest["num_tokens"] == single["num_tokens"] and two.num_examples == one.num_examples
    for i in range(one.num_examples):
        a, b = one.example(i), two.example(i)
        assert torch.equal(a[0], b[0]), i
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_torchrun_trains_from_the_cache_as_one_process(setup, tmp_path, full_cache, fsdp):
    """kd from the cache under torchrun (2 processes, gloo; data-parallel or FSDP) reaches the weights of one
    process with gradient accumulation 2 (the same global batches)."""
    import yaml

    single = train(config(setup, tmp_path / "single", teacher="", teacher_cache=full_cache, batch_size=2,
                          gradient_accumulation=2), **QUIET)
    cfg = config(setup, tmp_path / "ddp", teacher="", teacher_cache=full_cache, batch_size=2, fsdp=fsdp)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    torchrun("-m", "promptkd.cli", "train", str(path))
    a, b = weights(single), weights(cfg.output_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    shutil.rmtree(cfg.output_dir)
