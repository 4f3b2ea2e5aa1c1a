"""The teacher cache: a teacher's sparse targets over a training file, computed once (:func:`cache_teacher`,
``promptkd cache-teacher``) and read back by the trainer (:class:`TeacherCache`, ``teacher_cache=DIR``), so that
``kd`` trains without loading the teacher.

What is cached. The teacher runs over the training file exactly as the trainer feeds it: the tokenizer of
:func:`~promptkd.hf.models.load_tokenizer`, :func:`~promptkd.train.data.load_examples` with the same
``max_prompt_length`` / ``max_length`` (cache example i is the trainer's example i), batches of consecutive
examples through :func:`~promptkd.train.data.collate`, :func:`~promptkd.hf.models.lm_hidden` under ``no_grad``
in eval mode (float32 weights on the CPU, bfloat16 on CUDA, as the trainer's ``dtype: auto``). Only the counted
positions (``labels != -100``) are kept, in row-major order: example i has ``len(response_ids) + 1`` rows (its
response and the closing eos). Each row's targets are :func:`promptkd.fused_linear_topk` of its hidden state, its
logits transformed as the teacher's own are (:func:`~promptkd.hf.models.logit_transform` of its config, checked on
the model by :func:`~promptkd.hf.models.probe_logits`; recorded as ``teacher_logit_transform``):

- ``top_k=K``: the K most likely ids and their log-probabilities under the full softmax of logits / T;
- ``samples=S``: the distinct ids of S draws from softmax(logits / T), most drawn first, with log(count / S)
  (width k = S, padded with "no target").

Sampled targets draw the same whatever the batching, the number of processes or a resume: the Philox key of the
row at position p (0-based, among the example's counted rows) of example e is :func:`row_keys`: the words
(w0, w1, _, _) = Philox4x32-10(key=seed, counter=(e mod 2**32, e div 2**32, p, ROW_KEY_WORD)), and the row's key
is the 64 bits (w1 << 32) | w0 (as int64); ``fused_linear_topk`` then takes draw s of that row from Philox with
that key and counter (0, 0, s, 0). Distinct rows get independent 64-bit keys.

The directory. ``shard-<rank>-<index>.safetensors`` (about ``shard_mb`` MiB each, whole batches of whole
examples) hold ``ids`` [tokens, k] (uint16 when the vocabulary used has at most 65535 ids, 65535 meaning "no
target"; else int32 with -1), ``logprobs`` [tokens, k] (float16 or float32, -inf where there is no target) and
``offsets`` [examples + 1] int64 (each example's first row in the shard); a cache of ``mode: hidden`` holds
``hidden`` [tokens, D] (the teacher's final hidden states, bfloat16 or float32) in place of ids and
log-probabilities. ``cache.json`` records the settings
when a run starts; ``progress-rank<r>.json`` the shards each process completed (with their sha256), rewritten
after each shard; ``manifest.json`` is written last, once every process has finished: its presence means the
cache is complete. ``lock-rank<r>`` is locked (``flock``) by the process writing that rank's shards. Every file
is written under a temporary name, synced and renamed (:mod:`promptkd.files`).

Guarantees. A directory holding a cache (complete or not) is never overwritten unless asked (``overwrite``
removes the cache's own files, nothing else); ``resume`` continues an interrupted run with the same settings
(anything else is refused, naming the differences): it keeps every recorded shard whose sha256 matches,
recomputes a truncated or corrupt one, removes temporary files a kill left, and continues from the next
example; the result is byte-identical to an uninterrupted run's (same batches, a deterministic computation).
A second process writing the same directory is refused while the first holds its lock. Under torchrun each
process caches a contiguous share of the examples into its own shards; rank 0 writes the manifest.

Reading. :class:`TeacherCache` checks every shard's size and sha256 at open (``verify``), memory-maps the
shards and reads only the rows asked for: a cache larger than memory trains fine.

The modules: :mod:`.format` (file names, records, id encodings, row keys, fingerprints), :mod:`.checks` (the
arguments), :mod:`.source` (where targets come from: :class:`TeacherSource`, and :class:`InProcessTeacher`, the
model run in this process), :mod:`.writer` (:func:`write_cache` for any source, :func:`cache_teacher` for an
in-process teacher) and :mod:`.reader` (:class:`TeacherCache`). A new source (a served teacher) subclasses
:class:`TeacherSource` and calls :func:`write_cache`; the format, the writer and the reader stay as they are.
"""

from .checks import check_cache_args
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODES,
    SETTINGS_FILE,
    cache_files,
    decode_ids,
    encode_ids,
    lock_path,
    row_keys,
    template_digest,
    tokenizer_digest,
)
from .reader import TeacherCache
from .source import InProcessTeacher, TeacherSource, teacher_digest
from .writer import cache_teacher, write_cache

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODES", "SETTINGS_FILE", "InProcessTeacher", "TeacherCache",
           "TeacherSource", "cache_files", "cache_teacher", "check_cache_args", "decode_ids", "encode_ids",
           "lock_path", "row_keys", "teacher_digest", "template_digest", "tokenizer_digest", "write_cache"]
