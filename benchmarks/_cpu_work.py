"""The CPU-bound work of the benchmarks' CPU section: parse and compile one real source file.

Imported by both sides of the comparison: the pool's workers load it as a handlers module
(``compile_file``), ProcessPoolExecutor's workers call :func:`compile_source` directly. Stdlib
only (a pool worker must not import trio).
"""

from __future__ import annotations

import ast
import hashlib
import types
from typing import Any

from bridge_worker import Context, command


def compile_source(path: str) -> list[Any]:
    """Parse and compile the Python file at ``path``; return ``[path, AST digest, code objects]``.

    The digest is of ``ast.dump`` (deterministic in any process of the same interpreter, unlike
    ``marshal.dumps``, whose output depends on reference counts), and the count of code objects
    shows the compile ran: together they let the two peers' results be compared exactly.
    """
    with open(path, "rb") as f:
        source = f.read()
    tree = ast.parse(source, path)
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    code = compile(tree, path, "exec", dont_inherit=True)
    count = 0
    stack = [code]
    while stack:
        c = stack.pop()
        count += 1
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return [path, digest, count]


@command("compile_file", idempotent=True)
def compile_file(args: Any, ctx: Context) -> list[Any]:
    """``compile_source(args)``: args is the path of a Python source file."""
    return compile_source(str(args))
