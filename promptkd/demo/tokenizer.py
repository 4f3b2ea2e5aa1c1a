"""A small byte-level BPE tokenizer trained locally, for models trained from scratch (``promptkd demo``).

Like GPT-2's: the ByteLevel pre-tokenizer maps every byte to a printable character, the full 256-byte
alphabet is always in the vocabulary (so any text encodes, and ``decode(encode(text)) == text``), and one
special token, ``<|endoftext|>``, serves as end, beginning, unknown and padding token. Nothing is added
around an encoded text: callers append ``eos_token_id`` where they want one.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens, no merges


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Ids: ``<|endoftext|>`` is 0, the 256 byte symbols follow, then the merges in the order learned.
    ``vocab_size`` is an upper bound: a small corpus may support fewer merges (with ``min_frequency``
    occurrences at least), so size embeddings with ``len(tokenizer)``. Training is deterministic: the same
    texts give the same vocabulary, merges and ids.

    The result saves with ``save_pretrained(dir)`` and loads back with ``AutoTokenizer.from_pretrained(dir)``.
    ``padding_side`` is ``"right"`` (for training); set ``tokenizer.padding_side = "left"`` before batched
    generation.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"token), got {vocab_size}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int):
        raise TypeError(f"min_frequency must be an int, got {type(min_frequency).__name__}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be an iterable of strings (not one string), got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__} at index {i}")
    if not any(texts):
        raise ValueError("texts must contain at least one non-empty string")

    tokenizer = Tokenizer(models.BPE())  # no unknown token needed: every byte is in the alphabet
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # clean_up_tokenization_spaces=False: the cleanup would turn "a ." into "a." and break decode(encode(x)) == x.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, padding_side="right",
                                   clean_up_tokenization_spaces=False)
