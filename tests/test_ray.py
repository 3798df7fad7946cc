"""RayLauncher: Ray places and starts the workers, the pool supervises them.

Ray probes addresses other than loopback (cloud metadata, DNS) and binds other interfaces, and
this machine may send traffic to loopback only. So these tests run only inside a fresh network
namespace whose only interface is loopback, as ``.ci/run`` does::

    unshare --net --pid --fork --mount-proc --kill-child=SIGKILL bash -c \\
      'ip link set lo up && env RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled \\
       timeout 300 .venv/bin/python -m pytest tests/test_ray.py'

Elsewhere (or without Ray installed: the ``ray`` extra) they skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from typing import Any, Iterator

import psutil
import pytest
import trio

from conftest import ALL_HANDLERS, TOKEN, alive, kill_quietly, wait_gone
from pool import PoolConfig, WorkerConnectionError, open_pool

from pool.launchers import RayLauncher

#: .ci/run sets this inside its namespace: there these tests must run, never skip.
REQUIRED = os.environ.get("TWP_RAY_TESTS") == "required"
ONLY_LOOPBACK = [name for _, name in socket.if_nameindex()] == ["lo"]
if not ONLY_LOOPBACK:
    if REQUIRED:
        raise RuntimeError(f"TWP_RAY_TESTS=required, but interfaces other than lo are up: {socket.if_nameindex()}")
    pytest.skip(
        "Ray tests run only in a network namespace with only loopback (see this module's docstring)",
        allow_module_level=True,
    )
try:
    import ray
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("Ray is not installed (pip install -e '.[ray]')", allow_module_level=True)

CONFIG = PoolConfig(size=2, handlers=ALL_HANDLERS, start_timeout=30.0)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    """One local Ray for the module, as the recipe in shared/notes says (short temp dir: Unix
    socket paths are limited to 107 bytes)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=80 * 1024 * 1024,
        _temp_dir=temp,
        log_to_driver=False,
        resources={"pool_node": 2},
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)  # Ray leaves its session's logs there


def actor_hosts() -> list[psutil.Process]:
    """The live Ray actor processes that hold a worker."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "WorkerHost" in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


async def test_ray_places_the_workers_and_the_pool_supervises_them() -> None:
    exits: list[Any] = []
    config = PoolConfig(
        size=2, handlers=ALL_HANDLERS, start_timeout=30.0, event_callbacks=[exits.append]
    )
    # Placement is Ray's: a custom resource the test cluster has 2 of.
    launcher = RayLauncher(TOKEN, actor_options={"resources": {"pool_node": 1}})
    seen: set[int] = set()
    try:
        with trio.fail_after(120):
            async with open_pool(config, launcher=launcher) as pool:
                pids = pool.worker_pids()
                seen.update(pids)
                assert len(pids) == 2
                for pid in pids:  # each worker is the child of its Ray actor
                    assert "WorkerHost" in " ".join(psutil.Process(pid).parent().cmdline())
                assert {w["host"] for w in pool.health()["workers"].values()} == {"127.0.0.1"}
                assert await pool.execute("echo", {"x": 1}) == {"x": 1}
                assert [await pool.execute_in_session("s", "counter") for _ in range(3)] == [1, 2, 3]

                # SIGKILL of a worker: replaced through a new actor; its session moves on.
                (holder,) = [w.pid for w in pool.statistics().workers if w.sessions]
                kill_quietly([holder])
                with trio.fail_after(10):
                    while holder in pool.worker_pids():
                        await trio.sleep(0.01)
                assert await pool.execute_in_session("s", "counter") == 4
                with pytest.raises(WorkerConnectionError) as info:
                    await pool.execute("crash", 3)  # not idempotent: reported, not re-run
                assert "may or may not have run" in str(info.value)
                assert info.value.context["exit_code"] == 3  # the actor reaped it and told
                with trio.fail_after(30):
                    while pool.statistics().alive < 2:
                        await trio.sleep(0.05)
                seen.update(pool.worker_pids())
                assert len(actor_hosts()) == 2  # one actor per slot, the dead ones gone
        codes = {e.pid: e.data["exit_code"] for e in exits if e.kind == "worker_exited"}
        assert codes[holder] == -signal.SIGKILL
        await wait_gone(seen, timeout=10, zombies_too=True)
        with trio.fail_after(10):
            while actor_hosts():
                await trio.sleep(0.05)
    finally:
        kill_quietly(p for p in seen if alive(p))


async def test_ray_never_restarts_an_actor_behind_the_pool() -> None:
    """SIGKILL of an actor's process: its worker dies with it (PR_SET_PDEATHSIG), Ray does not
    restart the actor (max_restarts=0), and the pool starts a new one in its slot."""
    with pytest.raises(ValueError, match="only supervisor"):
        RayLauncher(TOKEN, actor_options={"max_restarts": 1})
    with pytest.raises(ValueError, match="only supervisor"):
        RayLauncher(TOKEN, actor_options={"max_task_retries": -1})
    seen: set[int] = set()
    try:
        with trio.fail_after(120):
            async with open_pool(CONFIG, launcher=RayLauncher(TOKEN)) as pool:
                seen.update(pool.worker_pids())
                victim = pool.worker_pids()[0]
                actor = psutil.Process(victim).parent()
                os.kill(actor.pid, signal.SIGKILL)
                await wait_gone([victim], timeout=10)
                with trio.fail_after(30):
                    while victim in pool.worker_pids() or pool.statistics().alive < 2:
                        await trio.sleep(0.05)
                seen.update(pool.worker_pids())
                assert await pool.execute("echo", 7) == 7
                assert len(actor_hosts()) == 2
                assert pool.statistics().restarts == 1
        await wait_gone(seen, timeout=10, zombies_too=True)
    finally:
        kill_quietly(p for p in seen if alive(p))
