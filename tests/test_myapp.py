"""An application's tests, written with the pool's testing kit (the README's example)."""

import pytest
import trio

from myapp.labels import label
from pool import RemoteError
from pool.testing import InProcessLauncher, assert_no_orphans, fake_pool

HANDLERS = ["myapp.commands"]


async def test_labels_survive_workers_being_killed(worker_pool, chaos):
    # Real worker processes; worker_pool fails the test if one outlives its pool.
    with trio.fail_after(30):
        async with worker_pool(handlers=HANDLERS, size=2) as pool:
            assert await label(pool, "hi there") == "greeting"
            await chaos.kill_worker(pool)  # SIGKILL one, and wait until it is replaced
            async with chaos.killing(pool, every=0.05):  # SIGKILL one every 50 ms meanwhile
                for _ in range(50):
                    assert await label(pool, "hi") == "greeting"
                    await trio.sleep(0.01)
        assert_no_orphans(worker_pool.pids)


async def slow_predict(args, ctx):
    await trio.sleep(60)
    return "late"


async def test_a_slow_model_gives_unknown_at_the_deadline(autojump_clock):
    # In-process workers on trio's virtual clock: the real `predict`, no process, no waiting.
    launcher = InProcessLauncher(simulate={"predict": slow_predict})
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1, launcher=launcher) as pool:
            t0 = trio.current_time()
            assert await label(pool, "hi") == "unknown"
            assert trio.current_time() == t0 + 5.0  # label's own deadline, exactly
            del launcher.simulate["predict"]  # the real handler again
            assert await label(pool, "hi") == "greeting"


async def test_a_bad_text_is_the_callers_problem(autojump_clock):
    with trio.fail_after(100):
        async with fake_pool(HANDLERS, size=1) as pool:
            with pytest.raises(RemoteError) as info:
                await label(pool, None)
            assert info.value.caller_fault
