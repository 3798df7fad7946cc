"""How a pool's workers are started: the public launchers (re-exports only).

- :class:`LocalLauncher`: subprocesses over pipes (the default).
- :class:`TcpLauncher`: workers that dial the pool over TCP after a mutual HMAC challenge
  (local ones it starts, and any started elsewhere with the token).
- :class:`RayLauncher`: one small Ray actor per slot starts and holds each worker (extra "ray").
"""

from pool._process import LocalLauncher as LocalLauncher
from pool._ray import RayLauncher as RayLauncher
from pool._tcp import TcpLauncher as TcpLauncher
