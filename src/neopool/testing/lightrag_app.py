"""LightRAG with a deterministic fake model, and a Celery app that ingests with it.

For tests, benchmarks and examples that need LightRAG's real pipeline (chunking,
extraction, merging, graph writes, queries) without a language model:

* :func:`fake_llm` answers LightRAG's prompts from the text itself: every
  capitalised word of a chunk is an entity, consecutive ones are related; a
  keyword prompt gets the query's capitalised words; anything else gets a fixed
  answer. :func:`fake_embedding` hashes text to a vector;
  :class:`CharacterTokenizer` needs no download. Same input, same graph.
* :func:`documents` writes documents that share entities, so concurrent
  ingestion in several processes writes the same entities at once.
* :func:`make_rag` builds a LightRAG with them; :func:`ingest` is one task's
  work (build, initialise, insert, finalise in ``finally``) with its figures.
* :func:`make_lightrag_app` adds Celery tasks that run :func:`ingest` on
  :class:`~neopool.celery.AsyncTask` (the persistent loop) or with
  ``asyncio.run`` per task (what stock LightRAG users do);
  :mod:`neopool.testing.lightrag_worker` is the worker module.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import resource
import tempfile
import time
from typing import Any

import numpy as np

#: The model's vector size.
EMBEDDING_DIM = 16
#: Environment variable naming the folder under which each worker process keeps its files.
WORKDIR_ENV = "NEOPOOL_LIGHTRAG_DIR"

_TUPLE = "<|#|>"  # LightRAG's PROMPTS["DEFAULT_TUPLE_DELIMITER"]
_DONE = "<|COMPLETE|>"  # PROMPTS["DEFAULT_COMPLETION_DELIMITER"]
_NAME = re.compile(r"\b[A-Z][a-z]+\b")

#: Names the documents draw their entities from.
VOCABULARY = [
    *("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India"),
    *("Juliett", "Kilo", "Lima", "Mike", "November", "Oscar", "Papa", "Quebec", "Romeo"),
    *("Sierra", "Tango", "Uniform", "Victor", "Whiskey", "Xray", "Yankee", "Zulu"),
]


def entity_names(text: str) -> list[str]:
    """The capitalised words of ``text``, each once, in order of appearance."""
    return list(dict.fromkeys(_NAME.findall(text)))


def _extraction(text: str) -> str:
    names = entity_names(text)
    rows = [f"entity{_TUPLE}{n}{_TUPLE}concept{_TUPLE}{n} appears in the text." for n in names]
    rows += [
        _TUPLE.join(("relation", a, b, "mentioned together", f"{a} is mentioned with {b}."))
        for a, b in itertools.pairwise(names)
    ]
    return "\n".join([*rows, _DONE])


async def fake_llm(
    prompt: str,
    system_prompt: str | None = None,
    history_messages: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """LightRAG's language model, answered from the prompt alone (deterministic)."""
    if "---Input Text---" in prompt:
        body = prompt.split("---Input Text---", 1)[1]
        parts = body.split("```")
        return _extraction(parts[1] if len(parts) > 2 else body)
    if "Based on the last extraction task" in prompt:
        return _DONE  # nothing was missed
    if "User Query:" in prompt:
        query = prompt.rsplit("User Query:", 1)[1].split("---Output---", 1)[0]
        return json.dumps(
            {
                "high_level_keywords": ["mentioned together"],
                "low_level_keywords": entity_names(query),
            }
        )
    return "The entities are mentioned together."


async def fake_embedding(texts: list[str]) -> np.ndarray[Any, Any]:
    """A vector per text from its hash: equal texts, equal vectors."""
    vectors = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        vectors[row] = np.frombuffer(digest[:EMBEDDING_DIM], dtype=np.uint8) / 255.0 + 0.01
    return vectors


class CharacterTokenizer:
    """One token per character: no tokenizer download."""

    def encode(self, content: str) -> list[int]:
        return [ord(c) for c in content]

    def decode(self, tokens: list[int]) -> str:
        return "".join(map(chr, tokens))


def documents(count: int, *, entities: int = 4, offset: int = 0) -> list[tuple[str, str]]:
    """``count`` documents ``(doc_id, text)``; each names ``entities`` of :data:`VOCABULARY`.

    Consecutive documents overlap in most of their entities, so any two
    processes ingesting neighbouring documents write the same entities.
    """
    docs = []
    for i in range(offset, offset + count):
        names = [VOCABULARY[(i + 2 * k) % len(VOCABULARY)] for k in range(entities)]
        sentences = [
            f"{a} works with {b} on project number {i}." for a, b in itertools.pairwise(names)
        ]
        docs.append((f"doc-{i}", " ".join(sentences)))
    return docs


def make_rag(working_dir: str, workspace: str, graph_storage: str = "PooledNeo4JStorage") -> Any:
    """A LightRAG on the fake model, its graph in ``graph_storage``, the rest in files."""
    from lightrag.utils import EmbeddingFunc, Tokenizer

    from lightrag import LightRAG
    from neopool.integrations.lightrag import register

    register()
    return LightRAG(
        working_dir=working_dir,
        workspace=workspace,
        graph_storage=graph_storage,
        embedding_func=EmbeddingFunc(
            embedding_dim=EMBEDDING_DIM, max_token_size=8192, func=fake_embedding
        ),
        llm_model_func=fake_llm,
        tokenizer=Tokenizer("characters", CharacterTokenizer()),
        enable_llm_cache=False,
    )


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:  # not Linux: the peak is the best there is
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


async def ingest(
    working_dir: str, workspace: str, doc_id: str, text: str, graph_storage: str
) -> dict[str, Any]:
    """One task's work, as a LightRAG user writes it; returns what it measured.

    ``stray_tasks_before``: asyncio tasks already alive on the loop when the
    task started (what earlier tasks left running).
    """
    loop = asyncio.get_running_loop()
    stray = len(asyncio.all_tasks()) - 1
    started = time.perf_counter()
    rag = make_rag(working_dir, workspace, graph_storage)
    await rag.initialize_storages()
    initialised = time.perf_counter()
    try:
        await rag.ainsert(text, ids=doc_id)
    finally:
        await rag.finalize_storages()
    from neopool.integrations.lightrag import lost_races_retried

    return {
        "pid": os.getpid(),
        "lost_races": lost_races_retried(),  # writes of this process run again so far (cumulative)
        "loop": str(id(loop)),
        "stray_tasks_before": stray,
        "tasks_after": len(asyncio.all_tasks()) - 1,
        "initialize_ms": round((initialised - started) * 1000, 3),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
        "rss_kib": _rss_kib(),
    }


def worker_directory() -> str:
    """This process's own folder for LightRAG's files (LightRAG's files are per process)."""
    base = os.environ.get(WORKDIR_ENV) or tempfile.gettempdir()
    path = os.path.join(base, f"worker-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def make_lightrag_app(broker_url: str, *, queue: str, main: str = "neopool_lightrag") -> Any:
    """A Celery app (configured like :func:`~neopool.testing.celery_app.make_app`) with:

    ``neopool.testing.lightrag_ingest``
        ``async def`` on :class:`~neopool.celery.AsyncTask`: :func:`ingest` on
        the worker's persistent loop;
    ``neopool.testing.lightrag_ingest_asyncio_run``
        a sync task running :func:`ingest` in ``asyncio.run``: a new loop (and,
        with stock ``Neo4JStorage``, a new driver) per task.
    """
    from neopool.celery import AsyncTask
    from neopool.testing.celery_app import make_app

    app = make_app(broker_url, queue=queue, main=main)

    @app.task(name="neopool.testing.lightrag_ingest", base=AsyncTask)  # type: ignore[untyped-decorator]
    async def lightrag_ingest(
        workspace: str, doc_id: str, text: str, graph_storage: str = "PooledNeo4JStorage"
    ) -> dict[str, Any]:
        return await ingest(worker_directory(), workspace, doc_id, text, graph_storage)

    @app.task(name="neopool.testing.lightrag_ingest_asyncio_run")  # type: ignore[untyped-decorator]
    def lightrag_ingest_asyncio_run(
        workspace: str, doc_id: str, text: str, graph_storage: str = "Neo4JStorage"
    ) -> dict[str, Any]:
        return asyncio.run(ingest(worker_directory(), workspace, doc_id, text, graph_storage))

    return app
