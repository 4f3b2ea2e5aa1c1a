"""A deterministic generator of open-ended instructions that ask for long answers (stories, explanations,
descriptions, advice, letters), for the ``open`` regime of ``promptkd experiment smollm2``.

Unlike :mod:`promptkd.demo.tasks`, no answer is computed: an instruction such as "Write a short story
about a fox who wants to learn to swim." has many good answers, and the references are written by the
teacher (:func:`answer_with_teacher`). Records::

    {"instruction": str, "family": str, "template": str (an id such as "story/2"), "heldout": bool}

Families: ``story``, ``explain``, ``describe``, ``advice``, ``letter``, ``compare``; each has several
phrasings, some held out (they appear only in ``test_heldout``). Fill-ins are drawn from fixed tuples, so a
seed gives the same records in any process (one ``random.Random(seed)``, never hash order). Each family holds
thousands of distinct instructions; no instruction occurs twice across the splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "valid", "test", "test_heldout")


@dataclass(frozen=True)
class OpenTemplate:
    id: str
    family: str
    text: str
    heldout: bool = False


def _family(name: str, rows: list[tuple[str, bool]]) -> tuple[OpenTemplate, ...]:
    return tuple(OpenTemplate(f"{name}/{i}", name, text, heldout) for i, (text, heldout) in enumerate(rows))


_T, _H = False, True
TEMPLATES: tuple[OpenTemplate, ...] = (
    *_family("story", [
        ("Write a short story about {a_character} who {goal}.", _T),
        ("Tell a story about {a_character} who {goal}.", _T),
        ("Write a children's story in which {a_character} {goal_past}.", _T),
        ("Imagine {a_character} who {goal}. Write what happens next.", _H),
    ]),
    *_family("explain", [
        ("Explain {topic} to a child.", _T),
        ("Explain in simple words {topic}.", _T),
        ("Why is it important to understand {topic}? Explain.", _T),
        ("Give a clear explanation of {topic} for a beginner.", _H),
    ]),
    *_family("describe", [
        ("Describe {place} in a few sentences.", _T),
        ("Write a short description of {place}.", _T),
        ("What would you see and hear in {place}? Describe it.", _T),
        ("Paint a picture in words of {place}.", _H),
    ]),
    *_family("advice", [
        ("Give some tips for {activity}.", _T),
        ("What advice would you give to someone who is {activity}?", _T),
        ("List a few things to keep in mind when {activity}.", _T),
        ("How can a beginner get better at {activity}? Give advice.", _H),
    ]),
    *_family("letter", [
        ("Write a short letter to {recipient} about {subject}.", _T),
        ("Write an email to {recipient} about {subject}.", _T),
        ("Write a note to {recipient} to talk about {subject}.", _H),
    ]),
    *_family("compare", [
        ("Compare {x} and {y}.", _T),
        ("What are the differences between {x} and {y}?", _T),
        ("How are {x} and {y} alike, and how do they differ?", _H),
    ]),
)

CHARACTERS = ("a fox", "a little robot", "an old fisherman", "a curious cat", "a young girl", "a shy dragon",
              "a brave mouse", "a lonely whale", "a farmer", "a clever crow", "a tired teacher", "a small boy",
              "a grumpy bear", "a wise owl", "a lost puppy", "a baker", "a friendly ghost", "an astronaut",
              "a musician", "a turtle", "a princess", "a squirrel", "a painter", "a young knight")
GOALS = (("wants to learn to swim", "learned to swim"), ("is looking for a new home", "found a new home"),
         ("wants to make a friend", "made a new friend"), ("is afraid of the dark", "stopped fearing the dark"),
         ("dreams of flying", "learned to fly"), ("loses something important", "lost something important"),
         ("wants to win a race", "won a race"), ("finds a secret door", "found a secret door"),
         ("wants to bake the perfect cake", "baked the perfect cake"), ("must cross a river", "crossed a river"),
         ("wants to see the sea", "saw the sea for the first time"), ("helps a stranger", "helped a stranger"),
         ("plants a magic seed", "planted a magic seed"), ("gets lost in a forest", "got lost in a forest"),
         ("wants to climb a mountain", "climbed a mountain"), ("finds a map", "found an old map"))
TOPICS = ("how rain forms", "why the sky is blue", "how plants make food", "why we need sleep",
          "how a computer stores information", "what gravity is", "how the heart works", "why the moon changes shape",
          "how bees make honey", "what electricity is", "why exercise is healthy", "how a bicycle works",
          "what a volcano is", "how money works", "why leaves change color in autumn", "how sound travels",
          "what recycling is", "how vaccines work", "why the seasons change", "how a rainbow forms",
          "what the internet is", "how fish breathe", "why we have laws", "how a seed grows")
PLACES = ("a busy train station", "a quiet library", "a beach at sunset", "a forest in winter", "a small village",
          "a market in the morning", "a mountain lake", "a school playground", "a city at night", "a farm in spring",
          "a hospital waiting room", "a bakery", "a desert", "a football stadium", "an old castle",
          "a garden after rain", "a kitchen during dinner", "a museum", "a harbor", "a snowy street")
ACTIVITIES = ("learning a new language", "cooking for friends", "starting to run", "saving money",
              "studying for an exam", "planting a garden", "traveling alone", "learning to play the guitar",
              "moving to a new city", "speaking in public", "taking care of a dog", "writing a story",
              "keeping a room tidy", "starting a new job", "learning to draw", "getting up early",
              "making new friends", "reading more books", "eating healthy", "learning to swim")
RECIPIENTS = ("a friend", "your teacher", "your neighbor", "your grandmother", "a new colleague", "your brother",
              "the manager of a shop", "a pen pal", "your coach", "an old classmate")
SUBJECTS = ("a trip you took", "a book you liked", "a problem at school", "a party next week", "a new hobby",
            "a lost package", "your summer plans", "a thank you for a gift", "a change of address", "a school project",
            "a recipe you tried", "a concert", "a noisy street", "a visit next month")
PAIRS = (("cats", "dogs"), ("summer", "winter"), ("the city", "the countryside"), ("books", "movies"),
         ("tea", "coffee"), ("the sun", "the moon"), ("trains", "planes"), ("rivers", "lakes"),
         ("walking", "cycling"), ("apples", "oranges"), ("mountains", "beaches"), ("letters", "emails"),
         ("breakfast", "dinner"), ("rain", "snow"), ("frogs", "toads"), ("pencils", "pens"))


#: Appended to an instruction (one each, "" included): they multiply the distinct instructions and vary the
#: length and tone of the answers asked for.
STYLES = ("", " Keep it short.", " Use simple words.", " Write about five sentences.", " Be friendly.",
          " Use an example.", " Make it fun to read.", " Write for a ten-year-old.")


def _instruction(template: OpenTemplate, rng: random.Random) -> str:
    goal, goal_past = rng.choice(GOALS)
    x, y = rng.choice(PAIRS)
    if rng.random() < 0.5:
        x, y = y, x
    values = dict(a_character=rng.choice(CHARACTERS), goal=goal, goal_past=goal_past, topic=rng.choice(TOPICS),
                  place=rng.choice(PLACES), activity=rng.choice(ACTIVITIES), recipient=rng.choice(RECIPIENTS),
                  subject=rng.choice(SUBJECTS), x=x, y=y)
    text = template.text.format(**values) + rng.choice(STYLES)
    return text[0].upper() + text[1:]


def generate_open_tasks(seed: int = 10, n_train: int = 2000, n_valid: int = 24, n_test: int = 100) -> dict:
    """``{"train", "valid", "test", "test_heldout"} -> list of records`` (module docstring): families take turns,
    ``test_heldout`` (``n_test`` records) uses only the held-out phrasings, the rest only the others."""
    for name, value in (("seed", seed), ("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    rng = random.Random(seed)
    families = tuple(dict.fromkeys(t.family for t in TEMPLATES))
    seen: set[str] = set()
    splits = {}
    for split, n, heldout in (("train", n_train, False), ("valid", n_valid, False), ("test", n_test, False),
                              ("test_heldout", n_test, True)):
        records, tries = [], 0
        while len(records) < n:
            family = families[len(records) % len(families)]
            pool = [t for t in TEMPLATES if t.family == family and t.heldout == heldout]
            template = rng.choice(pool)
            text = _instruction(template, rng)
            tries += 1
            if tries > 200 * (n + 1):
                raise ValueError(f"cannot draw {n} distinct {split} instructions (the templates hold too few)")
            if text in seen:
                continue
            seen.add(text)
            records.append({"instruction": text, "family": family, "template": template.id, "heldout": heldout})
        splits[split] = records
    return splits


def chat_prompt(instruction: str) -> str:
    """The instruction in SmolLM2-Instruct's chat format (no system turn), ending where the answer starts."""
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def answer_with_teacher(model, tokenizer, records: list[dict], *, max_new_tokens: int, seed: int,
                        temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 32) -> list[dict]:
    """Prompt records (``prompt``: :func:`chat_prompt` of the instruction; ``response``: the teacher's answer,
    sampled at ``temperature`` / ``top_p`` with :func:`promptkd.train.evaluate.sample`, cut at its first eos or
    after ``max_new_tokens`` tokens; ``family``, ``template``; ``truncated``: whether the answer was cut)."""
    from ..train.evaluate import sample

    prompts = [chat_prompt(r["instruction"]) for r in records]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = sample(model, ids, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, temperature=temperature,
                 top_p=top_p)
    return [{"prompt": p, "response": tokenizer.decode(o, skip_special_tokens=True).strip(), "family": r["family"],
             "template": r["template"], "truncated": len(o) >= max_new_tokens}
            for p, o, r in zip(prompts, out, records, strict=True)]
