"""using() is isolated per thread and per asyncio task."""

from __future__ import annotations

import asyncio
import threading

import pytest

import adbackends
from adbackends.registry import REGISTRY
from adbackends.selection import AUTO_ORDER

LOADABLE = [n for n in AUTO_ORDER if REGISTRY.failure(n) is None]


@pytest.fixture
def two_names():
    if len(LOADABLE) < 2:
        pytest.skip("needs two loadable backends")
    return LOADABLE[0], "loop"


def test_threads_do_not_see_each_others_using(two_names):
    first, second = two_names
    adbackends.use(first)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def in_block():
        with adbackends.using(second):
            seen["inside"] = adbackends.current().name
            inside.set()
            release.wait(10)
        seen["after"] = adbackends.current().name

    def observer():
        inside.wait(10)
        seen["other thread"] = adbackends.current().name
        release.set()

    threads = [threading.Thread(target=in_block), threading.Thread(target=observer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside": second, "other thread": first, "after": first}
    assert adbackends.current().name == first


def test_new_thread_sees_use_but_not_callers_using(two_names):
    first, second = two_names
    adbackends.use(first)
    seen = []
    with adbackends.using(second):
        t = threading.Thread(target=lambda: seen.append(adbackends.current().name))
        t.start()
        t.join(10)
    assert seen == [first]


def test_many_threads_nesting_concurrently(two_names):
    first, second = two_names
    errors = []
    barrier = threading.Barrier(6)

    def worker(i):
        mine, other = (first, second) if i % 2 else (second, first)
        try:
            barrier.wait()
            for _ in range(200):
                with adbackends.using(mine):
                    assert adbackends.current().name == mine
                    with adbackends.using(other):
                        assert adbackends.current().name == other
                    assert adbackends.current().name == mine
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert adbackends.explain().source == "auto"


def test_asyncio_tasks_are_isolated(two_names):
    first, second = two_names

    async def task(name, started, proceed, seen):
        with adbackends.using(name):
            started.set()
            await proceed.wait()
            seen[name] = adbackends.current().name

    async def main():
        seen = {}
        s1, s2, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.ensure_future(task(first, s1, go, seen))
        t2 = asyncio.ensure_future(task(second, s2, go, seen))
        await s1.wait()
        await s2.wait()
        # Both tasks are inside their blocks, interleaved; the caller is not.
        outside = adbackends.explain().source
        go.set()
        await asyncio.gather(t1, t2)
        return seen, outside

    seen, outside = asyncio.run(main())
    assert seen == {first: first, second: second}
    assert outside == "auto"
