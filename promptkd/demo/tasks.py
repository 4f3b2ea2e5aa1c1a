"""A deterministic generator of short instruction-following tasks with exactly computed answers.

The data of ``promptkd demo``: a tiny teacher is trained on it from scratch on a CPU and then distilled,
so every prompt is short (instruction + context under about 40 words) and every response shorter still
(a number, a word or a short list).

Each record is a dict::

    {"instruction": str, "context": str ("" when none), "response": str,
     "family": str, "template": str (a template id such as "sort/2")}

Exact answers: in every family the ``response`` is the one correct answer, computed from the values drawn,
in one fixed format per template (numbers without thousands separators; lists as ``"2, 5, 8"``; convert
templates answer either ``"3000"`` or ``"3000 meters"``, never both). No other string is correct, so an
evaluator can compare a generated answer with ``response`` by exact match after normalizing case,
whitespace and punctuation. One consequence of that normalization: the ``string`` templates asking for
capital letters are scored like copying the word.

Families, and what the answer is:

- ``arithmetic``: a sum, a difference (never negative) or a product of small numbers -> ``"12"``.
- ``sort``: 3 to 6 distinct integers from 1 to 20 sorted ascending or descending -> ``"2, 5, 8, 9"``.
- ``reverse``: 3 to 5 distinct short words in reverse order -> ``"sun, dog, cat"``.
- ``string``: one word in capitals, its letters reversed, its first letter, or its number of letters.
- ``extract``: one field (name, age, city, job) of the one person a generated passage in ``context`` describes.
- ``convert``: a unit conversion with an integer answer (km -> m, hours -> minutes, kg -> g, minutes ->
  seconds, meters -> centimeters).

Every family has several phrasings (templates). Those marked held out appear only in the ``test_heldout``
split, to measure how the models generalize to an instruction worded in a new way.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FAMILIES = ("arithmetic", "sort", "reverse", "string", "extract", "convert")
SPLITS = ("train", "valid", "test", "test_heldout")


@dataclass(frozen=True)
class Template:
    """One phrasing of a family: ``str.format`` patterns over the values the family draws.

    ``kind`` says which question is asked (``"add"``, ``"desc"``, ``"age"``, ``"km_m"``...); the values,
    the answer among them, are drawn by the family's ``_draw_<family>(rng, kind)``.
    """

    id: str
    family: str
    kind: str
    instruction: str
    context: str = ""
    response: str = "{answer}"
    heldout: bool = False


def _templates(family: str, rows: Sequence[tuple]) -> tuple[Template, ...]:
    # rows: (kind, instruction, context, response, heldout); ids follow the row order.
    return tuple(Template(f"{family}/{i}", family, *row) for i, row in enumerate(rows))


_TRAIN, _HELDOUT = False, True
TEMPLATES: tuple[Template, ...] = (
    *_templates("arithmetic", [
        ("add", "{name} has {a} {item} and buys {b} more. How many {item} does {pron} have now?", "", "{answer}",
         _TRAIN),
        ("sub", "{name} has {a} {item} and gives {b} away. How many {item} does {pron} have left?", "", "{answer}",
         _TRAIN),
        ("mul", "{name} has {a} bags with {b} {item} in each bag. How many {item} does {pron} have?", "", "{answer}",
         _TRAIN),
        ("add", "What is {a} plus {b}?", "", "{answer}", _TRAIN),
        ("sub", "What is {a} minus {b}?", "", "{answer}", _TRAIN),
        ("mul", "What is {a} times {b}?", "", "{answer}", _TRAIN),
        ("add", "A box holds {a} {item}. {name} puts in {b} more. How many {item} are in the box?", "", "{answer}",
         _HELDOUT),
        ("sub", "Subtract {b} from {a}.", "", "{answer}", _HELDOUT),
        ("mul", "Multiply {a} by {b}.", "", "{answer}", _HELDOUT),
    ]),
    *_templates("sort", [
        ("asc", "Sort these numbers from smallest to largest: {items}", "", "{answer}", _TRAIN),
        ("asc", "Put the numbers in ascending order.", "{items}", "{answer}", _TRAIN),
        ("desc", "Sort these numbers from largest to smallest: {items}", "", "{answer}", _TRAIN),
        ("desc", "Put the numbers in descending order.", "{items}", "{answer}", _TRAIN),
        ("asc", "List these numbers with the lowest first: {items}", "", "{answer}", _HELDOUT),
        ("desc", "Order the numbers below, biggest first.", "{items}", "{answer}", _HELDOUT),
    ]),
    *_templates("reverse", [
        ("reverse", "Reverse the order of these words: {items}", "", "{answer}", _TRAIN),
        ("reverse", "Write the words in reverse order.", "{items}", "{answer}", _TRAIN),
        ("reverse", "List these words from last to first: {items}", "", "{answer}", _TRAIN),
        ("reverse", "Turn this list around so that the last word comes first.", "{items}", "{answer}", _HELDOUT),
    ]),
    *_templates("string", [
        ("upper", "Write the word {word} in capital letters.", "", "{answer}", _TRAIN),
        ("upper", "Convert {word} to uppercase.", "", "{answer}", _TRAIN),
        ("reverse", "Spell the word {word} backwards.", "", "{answer}", _TRAIN),
        ("reverse", "Reverse the letters of {word}.", "", "{answer}", _TRAIN),
        ("first", "What is the first letter of {word}?", "", "{answer}", _TRAIN),
        ("first", "Which letter does the word {word} start with?", "", "{answer}", _TRAIN),
        ("count", "How many letters are in the word {word}?", "", "{answer}", _TRAIN),
        ("count", "Count the letters in {word}.", "", "{answer}", _TRAIN),
        ("upper", "Give {word} in all caps.", "", "{answer}", _HELDOUT),
        ("reverse", "Write {word} from its last letter to its first.", "", "{answer}", _HELDOUT),
        ("first", "Tell me the initial letter of {word}.", "", "{answer}", _HELDOUT),
        ("count", "What is the length of {word} in letters?", "", "{answer}", _HELDOUT),
    ]),
    *_templates("extract", [
        ("name", "What is the name of the person in the text?", "{passage}", "{answer}", _TRAIN),
        ("age", "How old is the person?", "{passage}", "{answer}", _TRAIN),
        ("city", "In which city does the person live?", "{passage}", "{answer}", _TRAIN),
        ("job", "What is the person's job?", "{passage}", "{answer}", _TRAIN),
        ("name", "Who is described in the text?", "{passage}", "{answer}", _TRAIN),
        ("age", "What is the age of {name}?", "{passage}", "{answer}", _TRAIN),
        ("city", "Where does {name} live?", "{passage}", "{answer}", _TRAIN),
        ("job", "What does {name} do for a living?", "{passage}", "{answer}", _TRAIN),
        ("name", "Name the person in the passage.", "{passage}", "{answer}", _HELDOUT),
        ("age", "State the person's age in years.", "{passage}", "{answer}", _HELDOUT),
        ("city", "Give the city mentioned in the text.", "{passage}", "{answer}", _HELDOUT),
        ("job", "What is the occupation of the person?", "{passage}", "{answer}", _HELDOUT),
    ]),
    *_templates("convert", [
        ("units", "How many {to} are in {n} {frm}?", "", "{answer}", _TRAIN),
        ("units", "Convert {n} {frm} to {to}.", "", "{answer} {to}", _TRAIN),
        ("units", "{n} {frm} is how many {to}?", "", "{answer}", _TRAIN),
        ("units", "Express {n} {frm} in {to}.", "", "{answer} {to}", _TRAIN),
        ("units", "What is {n} {frm} in {to}?", "", "{answer} {to}", _HELDOUT),
        ("units", "Change {n} {frm} into {to}. Give only the number.", "", "{answer}", _HELDOUT),
    ]),
)
TEMPLATE_BY_ID = {t.id: t for t in TEMPLATES}

# Vocabularies. Tuples, never sets: the generator's output must not depend on hash ordering.
NAMES = (("Tom", "he"), ("Maria", "she"), ("Ali", "he"), ("Sara", "she"), ("Ben", "he"), ("Lena", "she"),
         ("Omar", "he"), ("Anna", "she"), ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Mia", "she"),
         ("Sam", "he"), ("Nina", "she"), ("Max", "he"), ("Zoe", "she"), ("Ivan", "he"), ("Lucy", "she"),
         ("Paul", "he"), ("Rosa", "she"), ("Karl", "he"), ("Ella", "she"), ("Hugo", "he"), ("Amy", "she"))
ITEMS = ("apples", "pens", "books", "cookies", "marbles", "stickers", "cards", "eggs", "oranges", "shells",
         "coins", "stamps", "pencils", "candies", "flowers")
CITIES = ("Lisbon", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Prague", "Warsaw",
          "Athens", "Cairo", "Tokyo", "Lima", "Boston", "Denver", "Toronto", "Sydney", "Nairobi", "Seoul",
          "Munich", "Milan", "Lyon", "Porto", "Bergen", "Zurich", "Chicago", "Dallas", "Quebec", "Havana")
JOBS = ("teacher", "doctor", "nurse", "baker", "farmer", "pilot", "lawyer", "chef", "driver", "painter",
        "writer", "singer", "dentist", "engineer", "architect", "artist", "actor", "editor", "plumber",
        "carpenter", "gardener", "librarian", "banker", "waiter", "judge")
# Common lowercase words of 3 to 7 letters; the reverse family uses those of at most 5.
WORDS = (
    "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "door", "rain", "snow", "wind", "fire",
    "milk", "bread", "apple", "grape", "lemon", "peach", "house", "chair", "table", "clock", "phone", "paper",
    "river", "ocean", "beach", "field", "grass", "stone", "cloud", "storm", "light", "night", "dream", "heart",
    "horse", "mouse", "tiger", "zebra", "camel", "eagle", "sheep", "goat", "frog", "duck", "bear", "wolf", "lion",
    "hat", "cup", "pen", "box", "bag", "key", "map", "car", "bus", "ship", "boat", "train", "plane", "truck",
    "road", "bridge", "tower", "castle", "garden", "forest", "island", "valley", "desert", "winter", "summer",
    "spring", "autumn", "morning", "evening", "window", "mirror", "pillow", "blanket", "basket", "bottle",
    "candle", "rocket", "planet", "silver", "golden", "orange", "purple", "yellow", "green", "black", "white",
    "brown", "happy", "quiet", "quick", "brave", "calm", "kind", "warm", "cold", "soft", "loud", "dark", "bright",
    "music", "dance", "smile", "laugh", "sleep", "write", "read", "sing", "jump", "swim", "climb", "build",
    "paint", "cook", "drink", "eat", "run", "walk", "talk", "play", "work", "rest", "ball", "game", "toy", "doll",
    "kite", "drum", "flute", "piano", "guitar", "song", "word", "letter", "number", "circle", "square", "line",
    "point", "shape", "color", "water", "salt", "sugar", "honey", "butter", "cheese", "pizza", "pasta", "rice",
    "bean", "corn", "carrot", "potato", "tomato", "onion", "garlic", "pepper", "banana", "cherry", "melon", "plum",
    "shirt", "dress", "shoe", "sock", "coat", "scarf", "glove", "ring", "coin", "gold", "iron", "glass", "wood",
    "sand", "hill", "lake", "pond", "farm", "city", "town", "school", "market", "office", "doctor", "friend",
    "family", "mother", "father", "sister", "brother", "baby", "child", "king", "queen", "robot", "dragon",
)
SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 5)
UNITS = {  # kind: (from unit, to unit, factor, largest amount); small amounts where the factor is not a power of 10
    "km_m": ("kilometers", "meters", 1000, 99),
    "h_min": ("hours", "minutes", 60, 24),
    "kg_g": ("kilograms", "grams", 1000, 99),
    "min_s": ("minutes", "seconds", 60, 30),
    "m_cm": ("meters", "centimeters", 100, 99),
}
PASSAGES = (
    "{name} is {age} years old and lives in {city}. {Pron} works as {a_job}.",
    "{name} lives in {city} and works as {a_job}. {Pron} is {age} years old.",
    "{name} works as {a_job} in {city}. {Pron} is {age}.",
)


def _draw_arithmetic(rng: random.Random, kind: str) -> dict:
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        answer = a + b
    elif kind == "sub":
        a = rng.randint(2, 20)
        b = rng.randint(1, a)
        answer = a - b
    else:  # mul: a single digit times a small number
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        answer = a * b
    return dict(name=name, pron=pron, item=item, a=a, b=b, answer=str(answer))


def _draw_sort(rng: random.Random, kind: str) -> dict:
    numbers = rng.sample(range(1, 21), rng.randint(3, 6))
    ordered = sorted(numbers, reverse=kind == "desc")
    return dict(items=", ".join(map(str, numbers)), answer=", ".join(map(str, ordered)))


def _draw_reverse(rng: random.Random, kind: str) -> dict:
    words = rng.sample(SHORT_WORDS, rng.randint(3, 5))
    return dict(items=", ".join(words), answer=", ".join(reversed(words)))


def _draw_string(rng: random.Random, kind: str) -> dict:
    word = rng.choice(WORDS)
    answer = {"upper": word.upper(), "reverse": word[::-1], "first": word[0], "count": str(len(word))}[kind]
    return dict(word=word, answer=answer)


def _draw_extract(rng: random.Random, kind: str) -> dict:
    name, pron = rng.choice(NAMES)
    age, city, job = rng.randint(18, 80), rng.choice(CITIES), rng.choice(JOBS)
    a_job = ("an " if job[0] in "aeiou" else "a ") + job
    passage = rng.choice(PASSAGES).format(name=name, Pron=pron.capitalize(), age=age, city=city, a_job=a_job)
    answer = {"name": name, "age": str(age), "city": city, "job": job}[kind]
    return dict(name=name, passage=passage, answer=answer)


def _draw_convert(rng: random.Random, kind: str) -> dict:
    # Every convert template covers every unit pair: the pair is drawn here rather than fixed by the template.
    frm, to, factor, largest = UNITS[rng.choice(tuple(UNITS))]
    n = rng.randint(2, largest)  # >= 2: plural unit names read right
    return dict(n=n, frm=frm, to=to, answer=str(n * factor))


_DRAW = {"arithmetic": _draw_arithmetic, "sort": _draw_sort, "reverse": _draw_reverse, "string": _draw_string,
         "extract": _draw_extract, "convert": _draw_convert}


def _record(template: Template, values: dict) -> dict:
    return {"instruction": template.instruction.format(**values), "context": template.context.format(**values),
            "response": template.response.format(**values), "family": template.family, "template": template.id}


def _size(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_families(families) -> tuple[str, ...]:
    if isinstance(families, str) or not isinstance(families, Iterable):
        raise TypeError(f"families must be a sequence of family names such as ('sort',), got {families!r}")
    families = tuple(families)
    if not families:
        raise ValueError("families must name at least one family")
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"families: unknown family {family!r}; the families are {FAMILIES}")
    if len(set(families)) != len(families):
        raise ValueError(f"families must not repeat a family, got {families}")
    return families


# Consecutive duplicate draws after which a family counts as exhausted.
_MAX_RETRIES = 2000


def _split(rng: random.Random, n: int, families: tuple[str, ...], heldout: bool, seen: set, what: str) -> list:
    """``n`` records, families round-robin, each (instruction, context) new to ``seen`` (which it extends)."""
    pools = {f: [t for t in TEMPLATES if t.family == f and t.heldout == heldout] for f in families}
    records = []
    for i in range(n):
        family = families[i % len(families)]
        for _ in range(_MAX_RETRIES):
            template = rng.choice(pools[family])
            record = _record(template, _DRAW[family](rng, template.kind))
            key = (record["instruction"], record["context"])
            if key not in seen:
                break
        else:
            raise ValueError(f"{what} too large: family {family!r} ran out of distinct prompts "
                             f"after {sum(r['family'] == family for r in records)} records of this split")
        seen.add(key)
        records.append(record)
    return records


def generate_tasks(seed: int = 10, n_train: int = 4000, n_valid: int = 200, n_test: int = 300,
                   families: Sequence[str] = FAMILIES) -> dict[str, list[dict]]:
    """Generate the task splits: ``{"train", "valid", "test", "test_heldout"} -> list of records``.

    ``train``, ``valid`` and ``test`` use the training templates; ``test_heldout`` (``n_test`` records) uses
    only the held-out templates. Families take turns (round-robin in the order given), so every split and
    every prefix of one is balanced. No (instruction, context) pair occurs twice, within a split or across
    splits. See the module docstring for the record format and why ``response`` is the only correct answer.

    Deterministic: everything is drawn from one ``random.Random(seed)``, so a seed gives the same records
    in any process and Python run. The families hold a few thousand distinct prompts each (``string``, the
    smallest, about 1,600 on the training templates): sizes beyond that raise ``ValueError``.
    """
    _size("seed", seed, 0)
    sizes = {"n_train": _size("n_train", n_train, 1), "n_valid": _size("n_valid", n_valid, 0),
             "n_test": _size("n_test", n_test, 0)}
    families = _check_families(families)
    rng = random.Random(seed)
    seen: set = set()
    splits = {}
    given = ", ".join(f"{k}={v}" for k, v in sizes.items())
    for split, n, heldout in (("train", n_train, False), ("valid", n_valid, False), ("test", n_test, False),
                              ("test_heldout", n_test, True)):
        names = "n_test" if heldout else "n_train + n_valid + n_test"
        splits[split] = _split(rng, n, families, heldout, seen, f"{names} ({given})")
    return splits


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> str:
    """Writes one JSON object per line (UTF-8) atomically; see :func:`promptkd.files.write_jsonl`.

    Imported on call, so this module stays importable on its own (standard library only).
    """
    from ..files import write_jsonl as write

    return write(records, path)


def write_task_files(directory: str | os.PathLike, seed: int = 10, **sizes) -> dict[str, str]:
    """Generate the tasks and write ``<split>.jsonl`` for every split into ``directory`` (created if missing).

    ``sizes`` are the keyword arguments of :func:`generate_tasks` (``n_train``, ``n_valid``, ``n_test``,
    ``families``). Returns split -> path.
    """
    splits = generate_tasks(seed, **sizes)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    return {split: write_jsonl(records, os.path.join(directory, f"{split}.jsonl")) for split, records in splits.items()}
