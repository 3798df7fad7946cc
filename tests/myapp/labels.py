"""myapp's own logic around the pool: what its tests are about."""

from pool import Pool, PoolError


async def label(pool: Pool, text: str) -> str:
    """The label of ``text``, or "unknown" if the pool cannot give one within 5 seconds.
    A bad ``text`` is the caller's problem, and raises."""
    try:
        result: str = await pool.execute("predict", {"text": text}, timeout=5.0)
    except PoolError as exc:
        if exc.caller_fault:
            raise
        return "unknown"
    return result
