"""A served teacher: distillation targets from a vLLM or SGLang server instead of a teacher in this process.

    promptkd cache-teacher --server http://localhost:8000 --api vllm --tokenizer STUDENT_DIR \\
        --data train.jsonl --top-k 20 --out caches/served        # then: kd with teacher_cache=caches/served

:func:`cache_from_server` writes the teacher cache's format (:mod:`promptkd.train.teacher_cache`) from a server:
the same shards, manifest, resume, lock and digests as the in-process writer, the server's record in place of
weight digests. The modules: :mod:`.client` (HTTP: retries, backoff, requests in flight), :mod:`.apis` (vLLM's and
SGLang's requests and answers), :mod:`.source` (:class:`ServedTeacher`, the cache's teacher source) and
:mod:`.reference` (a small server of either API over a transformers model, for tests and trials).
"""

from .apis import APIS
from .cache import cache_from_server, check_server_args
from .client import Client, ServerError
from .source import ServedTeacher

__all__ = ["APIS", "Client", "ServedTeacher", "ServerError", "cache_from_server", "check_server_args"]
