"""Workers placed and started by Ray, supervised by the pool (extra "ray").

Ray only places and starts: for each slot, one small actor (no CPU of its own, ``max_restarts=0``
and ``max_task_retries=0``, so Ray never restarts or re-runs anything behind the pool's back)
starts ``python -m bridge_worker --connect ...`` on its node and holds it. The worker dials the
pool's :class:`~pool._tcp.TcpLauncher` listener with the slot's one-time nonce, and from then on
it is a TCP worker like any other: the pool's channel, matrix, circuits, sessions and idempotency
rules hold unchanged. Placement is Ray's own: ``actor_options`` go to ``.options()`` (resources,
``label_selector``, ``scheduling_strategy``, ...). The pool kills through the actor: the actor
SIGKILLs the worker's process group and reaps it (its exit code is what the pool reports), then
the actor itself is killed. The worker has PR_SET_PDEATHSIG, so it dies with its actor however
the actor ends.

This module imports Ray only when a RayLauncher is made: ``pool.launchers`` imports it without Ray.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
from typing import Any, Mapping

import trio

from pool._config import PoolConfig
from pool._errors import EXIT_UNKNOWN
from pool._process import host_pythonpath
from pool._tcp import TcpLauncher, TcpProcess

logger = logging.getLogger("pool.ray")

#: How long the pool waits for an actor to kill and reap its worker.
ACTOR_WAIT = 10.0

_FIXED = {"max_restarts": 0, "max_task_retries": 0}


def _ray() -> Any:
    try:
        # By name: type checking and importing this module must not need Ray.
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RuntimeError(
            "RayLauncher needs Ray: install the extra with pip install 'trio-worker-pool[ray]' "
            "(from a clone: pip install -e '.[ray]')"
        ) from exc


class WorkerHost:
    """The body of the Ray actor that starts and holds one worker process (runs in Ray)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # This node's Python (the one Ray runs here), its own process group (killed as one), and
        # --die-with-parent in args: it dies with this actor however the actor ends (ray.kill,
        # a SIGKILL, its node going away).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge_worker", *args],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            process_group=0,
            close_fds=True,
        )

    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> int:
        """SIGKILL the worker and everything it started; reap it; its exit code."""
        from bridge_worker._family import descendants

        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        return self.proc.wait()



class RayLauncher(TcpLauncher):
    """Each slot's worker placed and started by a Ray actor (see the module docstring).

    ``token``: as for :class:`~pool._tcp.TcpLauncher`. ``actor_options``: Ray's ``.options()``
    for each actor (``num_cpus`` defaults to 0: the actor only holds a process; ``max_restarts``
    and ``max_task_retries`` are always 0). ``ray_address``: the cluster to join with
    ``ray.init`` when Ray is not initialised yet (an application that already called
    ``ray.init`` keeps its own); ``init_options``: more ``ray.init`` arguments then. ``host``,
    ``port``: where the pool listens; workers dial ``advertise_host`` (default ``host``), which
    must be reachable from the Ray nodes.
    """

    def __init__(
        self,
        token: str | bytes,
        actor_options: Mapping[str, Any] | None = None,
        ray_address: str | None = None,
        *,
        init_options: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        **tcp_options: Any,
    ) -> None:
        self._ray_module = _ray()
        options = dict(actor_options or {})
        for key, value in _FIXED.items():
            if options.get(key, value) != value:
                raise ValueError(
                    f"actor_options[{key!r}] must be {value}: the pool is the only supervisor "
                    "(Ray must not restart or re-run anything behind its back)"
                )
        self._actor_options = {"num_cpus": 0, **options, **_FIXED}
        self._ray_address = ray_address
        self._init_options = dict(init_options or {})
        super().__init__(token, host, port, local_workers=0, **tcp_options)
        self._advertise = advertise_host or self.address[0]
        self._actor_class: Any = None
        self._env: dict[str, str] = {}

    def open(self, config: PoolConfig) -> None:
        super().open(config)
        ray = self._ray_module
        if not ray.is_initialized():
            ray.init(address=self._ray_address, **self._init_options)
        self._actor_class = ray.remote(WorkerHost)
        # The application's modules import in the worker as they do here (as over pipes).
        self._env = {"PYTHONPATH": host_pythonpath(), **config.env}

    def launch(self, handlers: tuple[str, ...], max_frame_size: int, max_session_state: int) -> TcpProcess:
        import secrets

        if self._actor_class is None:
            raise OSError("the RayLauncher's pool has not opened it")
        slot = secrets.token_hex(16)
        env = {**self._env, **self._worker_env(slot)}
        actor = self._actor_class.options(**self._actor_options).remote(self._worker_args(handlers), env)
        proc = RayProcess(self, actor)
        self._expect(proc, slot)
        self._start_soon(proc.watch_actor)
        return proc

    def _worker_args(self, handlers: tuple[str, ...]) -> list[str]:
        args = super()._worker_args(handlers)
        args[args.index("--connect") + 1] = f"[{self._advertise}]:{self.address[1]}"
        return args


class RayProcess(TcpProcess):
    """A TCP worker held by a Ray actor: killed, reaped and measured through the actor."""

    def __init__(self, launcher: RayLauncher, actor: Any) -> None:
        super().__init__(launcher, None)
        self._ray = launcher._ray_module
        self._actor = actor
        self._failure = ""

    async def _call(self, method: Any, *args: Any, timeout: float | None = ACTOR_WAIT) -> Any:
        ref = method.remote(*args)
        return await trio.to_thread.run_sync(
            lambda: self._ray.get(ref, timeout=timeout), abandon_on_cancel=True
        )

    async def watch_actor(self) -> None:
        """An actor that cannot start its worker ends the slot's wait at once, with Ray's reason."""
        try:
            await self._call(self._actor.pid, timeout=None)
        except Exception as exc:  # RayActorError, and whatever Ray raises for a failed actor
            self._failure = f"the Ray actor could not start the worker: {exc}"
            logger.warning("%s", self._failure)
            self.kill()

    async def receive_stderr(self) -> bytes:
        # A worker's stderr stays with Ray (its logs); an actor's failure to start it is said
        # here, once the slot knows whether its worker connected.
        await self._ready.wait()
        failure, self._failure = self._failure, ""
        return failure.encode()

    async def wait(self) -> int:
        await super().wait()  # its connection has ended, or the pool ended it
        try:
            code = int(await self._call(self._actor.kill))  # its exit code, if it exited already
        except Exception as exc:  # the actor or its node is gone: no exit code to be had
            logger.info("no exit code from the Ray actor: %s", exc)
            code = EXIT_UNKNOWN
        self._ray.kill(self._actor, no_restart=True)
        return code
