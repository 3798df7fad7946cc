"""A supervised pool of Python worker processes for trio applications.

Re-exports only; see the README for the API by example.
"""

from pool._breaker import BreakerConfig as BreakerConfig
from pool._breaker import CircuitBreaker as CircuitBreaker
from pool._breaker import CircuitRegistry as CircuitRegistry
from pool._breaker import CircuitState as CircuitState
from pool._config import PoolConfig as PoolConfig
from pool._errors import CallerError as CallerError
from pool._errors import Category as Category
from pool._errors import CircuitOpenError as CircuitOpenError
from pool._errors import CommunicationError as CommunicationError
from pool._errors import HealthCheckError as HealthCheckError
from pool._errors import InitializationError as InitializationError
from pool._errors import PoolClosedError as PoolClosedError
from pool._errors import PoolError as PoolError
from pool._errors import PoolSaturatedError as PoolSaturatedError
from pool._errors import PoolSystemError as PoolSystemError
from pool._errors import PoolTimeoutError as PoolTimeoutError
from pool._errors import RemoteError as RemoteError
from pool._errors import ResourceError as ResourceError
from pool._errors import SessionError as SessionError
from pool._errors import Severity as Severity
from pool._errors import Strategy as Strategy
from pool._errors import WorkerConnectionError as WorkerConnectionError
from pool._events import PoolEvent as PoolEvent
from pool._learning import AdaptiveConfig as AdaptiveConfig
from pool._learning import LearningConfig as LearningConfig
from pool._matrix import DEFAULT_POLICY as DEFAULT_POLICY
from pool._matrix import MatrixPolicy as MatrixPolicy
from pool._matrix import PoolErrorHandler as PoolErrorHandler
from pool._pool import Pool as Pool
from pool._pool import PoolStatistics as PoolStatistics
from pool._pool import WorkerStatistics as WorkerStatistics
from pool._pool import open_pool as open_pool
from pool._recovery import RecoveryStatistics as RecoveryStatistics
from pool._retry import circuit_breaker as circuit_breaker
from pool._retry import decorrelated_jitter as decorrelated_jitter
from pool._retry import exponential as exponential
from pool._retry import fibonacci as fibonacci
from pool._retry import immediate as immediate
from pool._retry import linear as linear
from pool._retry import retry as retry
