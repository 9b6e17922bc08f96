"""LightRAG ingestion with a fake LLM: the workload of the LightRAG benchmark and tests.

Each ingestion builds a LightRAG on the running loop with
``graph_storage="PooledNeo4JStorage"``, inserts one document and finalizes it.
The model is :mod:`neopool.testing.lightrag_app`'s deterministic fake (every
capitalised word an entity, consecutive ones related; hashed embeddings; a
character tokenizer: nothing is downloaded), made to take ``llm_delay_s``
seconds per call: the parameter that makes ingestion LLM-bound, as it is with
a real model. Each document names three entities of its own, so the graph
writes are real (``MERGE`` of three nodes and two relations through the pooled
driver).

Concurrent ingestions must not share a workspace in one process: LightRAG's
per-workspace pipeline would queue one behind the other and return early.
:func:`ingest_in_slot` therefore gives each ingestion one of this process's
workspaces that no other ingestion is using now (created on first use, then
reused: its database is prepared once, as for a real knowledge base);
:func:`ingest` takes the workspace from the caller. LightRAG's other storages
(JSON key-value, nano vector DB) write under a private directory this process
creates (``mkdtemp``, mode 0700) and removes when the process ends.

LightRAG keeps process-wide asyncio locks (``lightrag.kg.shared_storage``)
that bind to the first event loop that waits on them: in one process, every
ingestion must run on the same loop. :func:`register_task` adds the Celery
task; run it under prefork (a loop per child) or in neopool's process-loop mode.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Celery name of the ingestion task :func:`register_task` adds.
TASK_NAME = "neopool.demo.lightrag_ingest"
#: The fake LLM's answer time when none is given: a fast model.
DEFAULT_LLM_DELAY_S = 0.2
#: Entities and relations the fake LLM extracts from each document.
ENTITIES = 3
RELATIONS = ENTITIES - 1
_KINDS = ("Alpha", "Bravo", "Charlie")


def entity_names(doc_id: str) -> list[str]:
    """The document's own entities: capitalised words (letters only) derived from its id."""
    digest = hashlib.sha1(doc_id.encode()).hexdigest()[:10]
    suffix = "".join(chr(ord("a") + int(c, 16)) for c in digest)
    return [f"{kind}{suffix}" for kind in _KINDS[:ENTITIES]]


def document_text(doc_id: str, sentences: int = 12) -> str:
    """A short document (one LightRAG chunk) naming the document's entities, in a chain."""
    first, second, third = entity_names(doc_id)
    lines = [f"{first} works with {second}.", f"{second} reports to {third}."]
    filler = [f"this sentence {n} of document {doc_id} adds context." for n in range(sentences)]
    return " ".join([*lines, *filler])


class DelayedLLM:
    """The fake model, answering each call after ``delay_s`` seconds; counts its calls."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def __call__(self, prompt: str, *args: Any, **kwargs: Any) -> str:
        from neopool.testing.lightrag_app import fake_llm

        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await fake_llm(prompt, *args, **kwargs)


class _Scratch:
    """This process's private directory for LightRAG's files, removed at exit."""

    _lock = threading.Lock()
    _path: Path | None = None
    _pid = 0

    @classmethod
    def path(cls) -> Path:
        with cls._lock:
            if cls._path is None or cls._pid != os.getpid():
                cls._path = Path(tempfile.mkdtemp(prefix="neopool-lightrag-"))  # mode 0700
                cls._pid = os.getpid()
                atexit.register(cls.remove)
            return cls._path

    @classmethod
    def remove(cls) -> None:
        with cls._lock:
            path, cls._path = cls._path, None
            if path is not None and cls._pid == os.getpid():
                shutil.rmtree(path, ignore_errors=True)


class _Slots:
    """Workspaces of this process for :func:`ingest_in_slot`, each used by one ingestion at once."""

    _lock = threading.Lock()
    _free: list[int] = []
    _made = 0
    _pid = 0

    @classmethod
    @contextlib.contextmanager
    def take(cls) -> Iterator[int]:
        with cls._lock:
            if cls._pid != os.getpid():  # a forked child: none of the parent's are in use
                cls._free, cls._made, cls._pid = [], 0, os.getpid()
            if cls._free:
                slot = cls._free.pop()
            else:
                slot, cls._made = cls._made, cls._made + 1
        try:
            yield slot
        finally:
            with cls._lock:
                cls._free.append(slot)


async def ingest_in_slot(doc_id: str, base: str, llm_delay_s: float) -> dict[str, Any]:
    """:func:`ingest` into ``<base>_<pid>_<n>``, a workspace no other ingestion uses now."""
    with _Slots.take() as slot:
        return await ingest(doc_id, f"{base}_{os.getpid()}_{slot}", llm_delay_s)


async def ingest(doc_id: str, workspace: str, llm_delay_s: float) -> dict[str, Any]:
    """Insert one document with a LightRAG of its own on the running loop; what it took."""
    from lightrag.utils import EmbeddingFunc, Tokenizer

    from lightrag import LightRAG
    from neopool.integrations.lightrag import register
    from neopool.testing.lightrag_app import EMBEDDING_DIM, CharacterTokenizer, fake_embedding

    register()
    quiet_lightrag()
    llm = DelayedLLM(llm_delay_s)
    started = time.perf_counter()
    rag = LightRAG(
        working_dir=str(_Scratch.path() / workspace),
        workspace=workspace,
        graph_storage="PooledNeo4JStorage",
        embedding_func=EmbeddingFunc(
            embedding_dim=EMBEDDING_DIM, max_token_size=8192, func=fake_embedding
        ),
        llm_model_func=llm,
        tokenizer=Tokenizer("characters", CharacterTokenizer()),
    )
    await rag.initialize_storages()
    try:
        await rag.ainsert(document_text(doc_id))
    finally:
        await rag.finalize_storages()
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "loop": str(id(asyncio.get_running_loop())),
        "workspace": workspace,
        "ms": (time.perf_counter() - started) * 1000.0,
        "llm_calls": llm.calls,
    }


def quiet_lightrag() -> None:
    """LightRAG logs every step at INFO; keep its warnings and errors only."""
    import logging

    import lightrag.utils  # sets its logger to INFO when first imported

    lightrag.utils.logger.setLevel(logging.WARNING)


def register_task(app: Any) -> Any:
    """Add :data:`TASK_NAME` to ``app``: ``(doc_id, workspace, llm_delay_s)`` -> figures."""
    from celery.signals import worker_process_shutdown

    from neopool.celery import AsyncTask

    @app.task(name=TASK_NAME, base=AsyncTask)  # type: ignore[untyped-decorator]
    async def lightrag_ingest(
        doc_id: str, workspace: str, llm_delay_s: float = DEFAULT_LLM_DELAY_S
    ) -> dict[str, Any]:
        return await ingest(doc_id, workspace, llm_delay_s)

    worker_process_shutdown.connect(lambda **_: _Scratch.remove(), weak=False)
    quiet_lightrag()
    return lightrag_ingest
