"""Every snippet of the design note that uses the pool runs as written.

The note's code is copied in here with only its imports changed to ``neopool``
(and ``workspace`` defined), so the public API cannot drift from it.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from neopool import (
    BorrowedConnection,
    EventLoopConnectionPool,
    GlobalNeo4jConnectionPool,
    Neo4jConnectionConfig,
    Neo4jConnectionFactory,
    PoolClosed,
    PooledConnectionManager,
)
from neopool._release import driver_is_closed, driver_socket_count
from neopool.loop_pool import PoolState
from neopool.testing import BoltTarget
from polling import eventually_async

workspace = "note_examples"
pytestmark = pytest.mark.usefixtures("neopool_registry")


async def process_document(doc_id: str) -> dict[str, str]:
    async with Neo4jConnectionFactory.borrow_connection() as conn:
        driver = await conn.get_driver()
        database = await conn.prepare_database(workspace)
        await driver.execute_query(
            "MERGE (n:`note_examples` {entity_id: $id})", id=doc_id, database_=database
        )
    return {"status": "success", "doc": doc_id}


async def test_connection_reuse() -> None:
    # 第一个任务
    async with Neo4jConnectionFactory.borrow_connection() as conn1:
        driver1 = await conn1.get_driver()
        driver1_id = id(driver1)

    # 第二个任务（在同一事件循环中）
    async with Neo4jConnectionFactory.borrow_connection() as conn2:
        driver2 = await conn2.get_driver()
        driver2_id = id(driver2)

    # 验证连接被复用
    assert driver1_id == driver2_id  # ✅ 同一个驱动实例


async def test_concurrent_tasks() -> None:
    # 创建10个并发任务
    tasks = []
    for i in range(10):
        task = asyncio.create_task(process_document(f"doc_{i}"))
        tasks.append(task)

    # 等待所有任务完成
    results = await asyncio.gather(*tasks)

    # 验证：所有任务都成功，无冲突
    assert all(result["status"] == "success" for result in results)
    stats = await Neo4jConnectionFactory.get_pool_stats()
    (loop_stats,) = stats.values()
    assert loop_stats["drivers_created"] == 1
    assert loop_stats["borrows"] == 10
    assert loop_stats["in_use"] == 0


async def test_the_manager_level_api() -> None:
    # 单例模式，管理整个 Worker 进程的连接池
    pool_manager = GlobalNeo4jConnectionPool()

    # 自动为每个事件循环创建独立的连接池
    loop_pool = await pool_manager.get_pool()  # 基于当前事件循环ID

    # 提供统一的借用接口
    connection = await pool_manager.borrow_connection()
    assert isinstance(loop_pool, EventLoopConnectionPool)
    assert isinstance(connection, PooledConnectionManager)
    assert connection.in_use
    assert connection.pool is loop_pool
    assert (loop_pool.max_size, loop_pool.min_size) == (10, 2)
    driver = await connection.get_driver()
    records, _, _ = await driver.execute_query("RETURN 1 AS one", database_="neo4j")
    assert records[0]["one"] == 1
    await pool_manager.return_connection(connection)
    assert not connection.in_use
    assert loop_pool.in_use == 0
    assert await pool_manager.get_pool() is loop_pool


async def test_the_borrow_snippet_gives_driver_and_database() -> None:
    async with Neo4jConnectionFactory.borrow_connection() as borrowed:
        driver = await borrowed.get_driver()
        database = await borrowed.prepare_database(workspace)
        assert isinstance(borrowed, BorrowedConnection)
        records, _, _ = await driver.execute_query("RETURN 2 AS two", database_=database)
        assert records[0]["two"] == 2


class Neo4JStorage:
    """The note's LightRAG storage, verbatim apart from the constructor."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self._borrowed_connection: BorrowedConnection | None = None

    async def initialize(self) -> None:
        # 借用连接
        self._borrowed_connection = Neo4jConnectionFactory.borrow_connection()
        await self._borrowed_connection.__aenter__()

        # 获取驱动和数据库
        self._driver = await self._borrowed_connection.get_driver()
        self._DATABASE = await self._borrowed_connection.prepare_database(self.workspace)

    async def finalize(self) -> None:
        # 归还连接到池
        if self._borrowed_connection:
            await self._borrowed_connection.__aexit__(None, None, None)


async def test_the_lightrag_storage_pattern_borrows_in_initialize_returns_in_finalize() -> None:
    storages = [Neo4JStorage(workspace) for _ in range(3)]
    for storage in storages:
        await storage.initialize()
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert pool.in_use == 3
    assert len({id(storage._driver) for storage in storages}) == 1
    assert {storage._DATABASE for storage in storages} == {storages[0]._DATABASE}
    for storage in storages:
        await storage.finalize()
        await storage.finalize()  # a second finalize is harmless
    assert pool.in_use == 0


async def test_an_exception_in_the_block_still_returns_the_connection() -> None:
    logger = logging.getLogger("test")

    async def robust_lightrag_task() -> None:
        try:
            async with Neo4jConnectionFactory.borrow_connection():
                # LightRAG 操作
                raise ValueError("task failed")
        except Exception as e:
            # 连接会自动归还，即使发生异常
            logger.error(f"Task failed: {e}")
            raise

    with pytest.raises(ValueError, match="task failed"):
        await robust_lightrag_task()
    pool = await GlobalNeo4jConnectionPool().get_pool()
    assert (pool.in_use, pool.available) == (0, pool.total)


async def test_close_all_pools_under_a_holder_says_the_pool_was_closed_under_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The holder did not leak its lease: the close came while it was at work, and says so."""
    caplog.set_level(logging.WARNING, logger="neopool")
    inside, resume = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with Neo4jConnectionFactory.borrow_connection() as conn:
            await conn.get_driver()
            inside.set()
            await resume.wait()
            with pytest.raises(PoolClosed):
                await conn.get_driver()  # the pool was closed under it

    holding = asyncio.create_task(holder())
    await asyncio.wait_for(inside.wait(), 30)
    pool = await GlobalNeo4jConnectionPool().get_pool()
    await GlobalNeo4jConnectionPool().close_all_pools(timeout=1)
    assert pool.state is PoolState.CLOSED
    resume.set()
    await asyncio.wait_for(holding, 30)  # leaving its async with raises nothing

    (line,) = [r.getMessage() for r in caplog.records if "still in use" in r.getMessage()]
    assert line.startswith(
        f"neopool: the pool of event loop {pool.loop_id} was closed by close_all_pools() "
        f"while a lease was still in use; it was borrowed at "
    )
    assert "test_note_api.py" in line  # where the holder borrowed it
    assert "in holder" in line
    assert "never returned" not in line  # the holder is not blamed for the close


async def test_the_stats_have_the_notes_keys_and_the_monitor_snippet_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Neo4jConnectionFactory.borrow_connection():
        stats = await Neo4jConnectionFactory.get_pool_stats()
    logger = logging.getLogger("monitor")

    # 定期检查连接池状态 (the note's monitor_connection_pools body)
    for loop_id, pool_stats in stats.items():
        utilization = pool_stats["in_use"] / pool_stats["max_size"]

        if utilization > 0.8:  # 使用率超过80%
            logger.warning(f"High connection pool utilization: {utilization:.2%}")

        if pool_stats["available"] == 0:  # 无可用连接
            logger.error(f"Connection pool exhausted for loop {loop_id}")

    loop_id = str(id(asyncio.get_running_loop()))
    assert set(stats) == {loop_id}
    assert stats[loop_id]["in_use"] == 1
    assert stats[loop_id]["max_size"] == 10
    assert stats[loop_id]["total"] == stats[loop_id]["available"] + 1


def test_the_worker_lifecycle_snippets(neopool_bolt: BoltTarget) -> None:
    """setup at process init, tasks in their loops, cleanup with asyncio.run at shutdown."""
    config_from_setup = neopool_bolt.config()

    def setup_worker_neo4j_config(**kwargs: object) -> None:
        config = config_from_setup  # the note reads Neo4jConnectionConfig() from env here
        GlobalNeo4jConnectionPool.set_config(config)
        # 注意：只设置配置，不创建连接

    async def cleanup_worker_neo4j_config_async(**kwargs: object) -> None:
        pool = GlobalNeo4jConnectionPool()
        await pool.close_all_pools()

    def cleanup_worker_neo4j_config(**kwargs: object) -> None:
        try:
            loop = asyncio.get_running_loop()
            loop.create_task(cleanup_worker_neo4j_config_async(**kwargs))  # noqa: RUF006
        except RuntimeError:
            asyncio.run(cleanup_worker_neo4j_config_async(**kwargs))

    setup_worker_neo4j_config()
    assert GlobalNeo4jConnectionPool().pools() == []  # configuring opens nothing

    worker_loop = asyncio.new_event_loop()
    results = []
    try:
        for i in range(3):  # tasks of a worker thread that keeps its loop
            results.append(worker_loop.run_until_complete(process_document(f"life_{i}")))
        (pool,) = GlobalNeo4jConnectionPool().pools()
        assert (pool.stats()["drivers_created"], pool.stats()["borrows"]) == (1, 3)

        driver = pool.driver
        assert driver is not None
        cleanup_worker_neo4j_config()
        assert GlobalNeo4jConnectionPool().pools() == []
        worker_loop.run_until_complete(asyncio.sleep(0))  # the idle loop runs its close
        assert pool.closed
        # ... to the end, on that loop: the driver closed by driver.close(), no socket left.
        closed = eventually_async(lambda: pool.state is PoolState.CLOSED)
        assert worker_loop.run_until_complete(closed)
        assert driver_is_closed(driver)
        assert driver_socket_count(driver) == 0
    finally:
        worker_loop.run_until_complete(worker_loop.shutdown_asyncgens())
        worker_loop.close()
    assert all(result["status"] == "success" for result in results)


def test_the_config_snippet_is_accepted_by_set_config() -> None:
    config = Neo4jConnectionConfig(
        # Neo4j 连接设置
        uri="neo4j://localhost:7687",
        username="neo4j",
        password="password",
        max_connection_pool_size=50,  # Neo4j 驱动内部连接池大小
        # 应用层连接池设置
        pool_max_size=10,  # 每个事件循环最大连接数
        pool_min_size=2,  # 每个事件循环最小连接数
    )
    GlobalNeo4jConnectionPool.set_config(config)
    assert GlobalNeo4jConnectionPool.get_config() is config


def test_the_registry_is_one_object_for_every_thread() -> None:
    seen: list[GlobalNeo4jConnectionPool] = []
    threads = [
        threading.Thread(target=lambda: seen.append(GlobalNeo4jConnectionPool())) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(registry) for registry in seen}) == 1
    assert seen[0] is GlobalNeo4jConnectionPool()
