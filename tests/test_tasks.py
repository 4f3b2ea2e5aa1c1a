"""The demo's task generator (promptkd.demo.tasks) and its locally trained tokenizer (promptkd.demo.tokenizer).

Every answer is recomputed here from the words of its record, without the generator's own drawing code.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from promptkd.demo import tasks
from promptkd.demo.tokenizer import EOS_TOKEN, train_tokenizer

SMALL = dict(n_train=600, n_valid=60, n_test=120)


@pytest.fixture(scope="module")
def splits():
    return tasks.generate_tasks()  # the demo's default sizes


def all_records(splits):
    return [(name, r) for name, records in splits.items() for r in records]


# ---------------------------------------------------------------- determinism, sizes, splits


def test_same_seed_same_records_different_seed_different():
    assert tasks.generate_tasks(3, **SMALL) == tasks.generate_tasks(3, **SMALL)
    assert tasks.generate_tasks(3, **SMALL) != tasks.generate_tasks(4, **SMALL)


def _digest_in_subprocess(hash_seed: str) -> str:
    # tasks.py needs only the standard library: load it by path so the child does not import torch.
    code = (
        "import hashlib, importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('tasks', sys.argv[1])\n"
        "m = sys.modules['tasks'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(hashlib.sha256(json.dumps(m.generate_tasks(7, 600, 60, 120)).encode()).hexdigest())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", code, tasks.__file__], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_same_seed_same_records_across_processes():
    here = hashlib.sha256(json.dumps(tasks.generate_tasks(7, **SMALL)).encode()).hexdigest()
    assert _digest_in_subprocess("1") == _digest_in_subprocess("2") == here


def test_split_sizes_and_family_balance(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 4000, "valid": 200, "test": 300, "test_heldout": 300}
    for name, records in splits.items():
        counts = Counter(r["family"] for r in records)
        assert set(counts) == set(tasks.FAMILIES), name
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)


def test_record_fields(splits):
    for _, r in all_records(splits):
        assert set(r) == {"instruction", "context", "response", "family", "template"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"] and r["response"]
        assert r["template"].startswith(r["family"] + "/")


def test_no_prompt_in_two_splits_or_twice_in_one(splits):
    keys = [(r["instruction"], r["context"]) for _, r in all_records(splits)]
    assert len(set(keys)) == len(keys)


def test_heldout_templates_only_in_test_heldout(splits):
    heldout = {t.id for t in tasks.TEMPLATES if t.heldout}
    for family in tasks.FAMILIES:
        ts = [t for t in tasks.TEMPLATES if t.family == family]
        assert sum(not t.heldout for t in ts) >= 3 and sum(t.heldout for t in ts) >= 1, family
    for name, r in all_records(splits):
        assert (r["template"] in heldout) == (name == "test_heldout"), (name, r)
    assert {r["template"] for r in splits["test_heldout"]} == heldout


def test_families_subset_and_order():
    out = tasks.generate_tasks(1, n_train=10, n_valid=2, n_test=4, families=("sort", "convert"))
    assert [r["family"] for r in out["train"][:4]] == ["sort", "convert", "sort", "convert"]
    assert all(r["family"] in ("sort", "convert") for records in out.values() for r in records)


def test_lengths(splits):
    for _, r in all_records(splits):
        assert len((r["instruction"] + " " + r["context"]).split()) <= 40, r
        assert len(r["response"].split()) <= 12, r


# ---------------------------------------------------------------- answers, recomputed from the text


def numbers(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def listed(r):
    """The list a sort or reverse record asks about: in the context, or after the instruction's colon."""
    text = r["context"] or r["instruction"].split(":", 1)[1]
    return [x.strip() for x in text.split(",")]


def has(text, *phrases):
    return any(re.search(rf"\b{p}\b", text, re.IGNORECASE) for p in phrases)


def solve_arithmetic(r):
    a, b = numbers(r["instruction"])
    text = r["instruction"]
    if has(text, "plus", "buys", "puts in"):
        return str(a + b)
    if has(text, "minus", "gives"):
        return str(a - b)
    if has(text, "subtract"):  # "Subtract b from a."
        return str(b - a)
    assert has(text, "times", "bags", "multiply"), text
    return str(a * b)


def solve_sort(r):
    values = [int(x) for x in listed(r)]
    descending = has(r["instruction"], "largest to smallest", "descending", "biggest first")
    assert descending or has(r["instruction"], "smallest to largest", "ascending", "lowest first"), r
    return ", ".join(map(str, sorted(values, reverse=descending)))


def solve_reverse(r):
    return ", ".join(reversed(listed(r)))


def solve_string(r):
    text = r["instruction"]
    # The word: what fills the template's {word} slot (the words "word" and "letter" may be drawn too).
    pattern = re.escape(tasks.TEMPLATE_BY_ID[r["template"]].instruction).replace(r"\{word\}", "([a-z]+)")
    word = re.fullmatch(pattern, text).group(1)
    if has(text, "capital letters", "uppercase", "all caps"):
        return word.upper()
    if has(text, "backwards", "reverse the letters", "last letter to its first"):
        return word[::-1]
    if has(text, "first letter", "start with", "initial letter"):
        return word[0]
    assert has(text, "how many letters", "count the letters", "length"), text
    return str(len(word))


def solve_extract(r):
    passage, text = r["context"], r["instruction"]
    if has(text, "old", "age"):
        (age,) = numbers(passage)
        return str(age)
    if has(text, "city", "live"):
        return re.search(r"\bin ([A-Z]\w+)", passage).group(1)
    if has(text, "job", "for a living", "occupation"):
        return re.search(r"\bas an? (\w+)", passage).group(1)
    assert has(text, "name", "who"), text
    return passage.split()[0]


UNIT_FACTORS = {("kilometers", "meters"): 1000, ("hours", "minutes"): 60, ("kilograms", "grams"): 1000,
                ("minutes", "seconds"): 60, ("meters", "centimeters"): 100}


def solve_convert(r):
    text = r["instruction"]
    ((frm, to),) = [(f, t) for f, t in UNIT_FACTORS if re.search(rf"\d+ {f}\b", text) and has(text, t)]
    value = str(numbers(text)[0] * UNIT_FACTORS[frm, to])
    return value if r["response"] == value else f"{value} {to}"


SOLVERS = {"arithmetic": solve_arithmetic, "sort": solve_sort, "reverse": solve_reverse, "string": solve_string,
           "extract": solve_extract, "convert": solve_convert}


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_answers_recomputed(splits, family):
    for _, r in all_records(splits):
        if r["family"] == family:
            assert r["response"] == SOLVERS[family](r), r


def test_one_convert_answer_format_per_template(splits):
    # "3000" or "3000 meters": the template decides, never the draw.
    bare = {}
    for _, r in all_records(splits):
        if r["family"] == "convert":
            bare.setdefault(r["template"], set()).add(r["response"].isdigit())
    assert all(len(v) == 1 for v in bare.values()) and {True, False} <= set.union(*bare.values())


def test_arithmetic_ranges_and_lists(splits):
    for _, r in all_records(splits):
        if r["family"] == "arithmetic":
            assert 0 <= int(r["response"]) <= 108
        if r["family"] in ("sort", "reverse"):
            items = listed(r)
            assert 3 <= len(items) <= (6 if r["family"] == "sort" else 5) and len(set(items)) == len(items)


# ---------------------------------------------------------------- arguments


BAD_ARGUMENTS = [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(n_train=0), ValueError, "n_train"),
    (dict(n_valid=-1), ValueError, "n_valid"),
    (dict(n_test=True), TypeError, "n_test"),
    (dict(families=("sorting",)), ValueError, "families"),
    (dict(families=()), ValueError, "families"),
    (dict(families="sort"), TypeError, "families"),
    (dict(families=("sort", "sort")), ValueError, "families"),
    (dict(n_train=5000, families=("string",)), ValueError, "n_train"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_ARGUMENTS, ids=[f"{e[2]}-{i}" for i, e in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        tasks.generate_tasks(**kwargs)


# ---------------------------------------------------------------- files


def test_write_task_files_readable_jsonl(tmp_path):
    paths = tasks.write_task_files(tmp_path / "data", seed=5, **SMALL)
    assert set(paths) == {"train", "valid", "test", "test_heldout"}
    expected = tasks.generate_tasks(5, **SMALL)
    for split, path in paths.items():
        assert os.path.basename(path) == f"{split}.jsonl"
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == expected[split]
    assert sorted(os.listdir(tmp_path / "data")) == sorted(f"{s}.jsonl" for s in paths)  # no temporary files left


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "x.jsonl"
    tasks.write_jsonl([{"a": "é"}], path)
    with pytest.raises(TypeError):
        tasks.write_jsonl([{"a": 1}, {"b": object()}], path)
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n'  # the old file, whole
    assert os.listdir(tmp_path) == ["x.jsonl"]


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def corpus():
    records = tasks.generate_tasks(2, **SMALL)["train"]
    return [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in records]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


ROUND_TRIP = ["Sort these numbers: 3, 1, 2", "  two  spaces , and a tab\tand\nnewline ", "héllo wörld, ça va ?",
              "日本語のテキスト", "emoji 🙂👍🏽 and ∑ x² ≤ ∞", "a . b ' s don't", "<|endoftext|> inside", ""]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_special_tokens_and_no_bos(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.eos_token_id == 0 and tokenizer.padding_side == "right"
    assert len(tokenizer) <= 512
    ids = tokenizer("cat")["input_ids"]
    assert ids == tokenizer.encode("cat", add_special_tokens=False) and tokenizer.eos_token_id not in ids


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == (EOS_TOKEN, EOS_TOKEN, "right")
    for text in ROUND_TRIP:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text


def test_tokenizer_training_is_deterministic(corpus, tokenizer):
    again = train_tokenizer(corpus, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


TOKENIZER_ERRORS = [
    (dict(vocab_size=256), ValueError, "vocab_size"),
    (dict(vocab_size="2048"), TypeError, "vocab_size"),
    (dict(min_frequency=0), ValueError, "min_frequency"),
    (dict(texts=[]), ValueError, "texts"),
    (dict(texts=["", ""]), ValueError, "texts"),
    (dict(texts="just one string"), TypeError, "texts"),
    (dict(texts=["ok", 3]), TypeError, "texts"),
]


@pytest.mark.parametrize("kwargs,exc,name", TOKENIZER_ERRORS,
                         ids=[f"{e[2]}-{i}" for i, e in enumerate(TOKENIZER_ERRORS)])
def test_tokenizer_bad_arguments(kwargs, exc, name):
    kwargs = {"texts": ["some text"], **kwargs}
    with pytest.raises(exc, match=name):
        train_tokenizer(**kwargs)


# ---- the open-ended instructions of the experiment's open regime (promptkd.demo.open_tasks) ----

def test_open_tasks_are_deterministic_distinct_balanced_and_hold_out_phrasings():
    from promptkd.demo.open_tasks import TEMPLATES, generate_open_tasks

    a, b = generate_open_tasks(3, 600, 12, 60), generate_open_tasks(3, 600, 12, 60)
    assert a == b and a != generate_open_tasks(4, 600, 12, 60)
    assert {k: len(v) for k, v in a.items()} == {"train": 600, "valid": 12, "test": 60, "test_heldout": 60}
    texts = [r["instruction"] for split in a.values() for r in split]
    assert len(texts) == len(set(texts))  # no instruction twice, within or across splits
    families = [r["family"] for r in a["train"]]
    assert max(families.count(f) for f in set(families)) - min(families.count(f) for f in set(families)) <= 1
    heldout = {t.id for t in TEMPLATES if t.heldout}
    assert all((r["template"] in heldout) == (split == "test_heldout") for split, rs in a.items() for r in rs)
    assert all(r["instruction"][0].isupper() and "{" not in r["instruction"] for r in a["train"])
    with pytest.raises(ValueError, match="n_train must be an int >= 0"):
        generate_open_tasks(1, -1)


def test_open_tasks_answered_by_a_model_are_prompt_records(tokenizer):
    """answer_with_teacher: the chat-format prompt, the model's sampled answer cut at eos or at the token limit
    (``truncated``), the family and template; a tiny random model stands in for the teacher."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from promptkd.demo.open_tasks import answer_with_teacher, chat_prompt, generate_open_tasks

    records = generate_open_tasks(1, 6, 0, 0)["train"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    out = answer_with_teacher(model, tokenizer, records, max_new_tokens=5, seed=1, batch_size=4)
    assert [r["prompt"] for r in out] == [chat_prompt(r["instruction"]) for r in records]
    assert all(isinstance(r["response"], str) and r["family"] and r["template"] for r in out)
    assert out == answer_with_teacher(model, tokenizer, records, max_new_tokens=5, seed=1, batch_size=4)
    assert all(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) <= 5 + 2 or r["truncated"]
               for r in out)
