"""Imports py_ecc and py-evm once with the interpreter's recursion limit put back afterwards.

Both raise the limit when imported (to 100,000 and 12,288). That limit is also what stops msgspec from
recursing through deeply nested peer input before the C stack overflows: at 100,000, a nested message
or Stage IR program segfaults the whole node instead of being refused (found by the IR tamper tests
running after the chain tests). Importing them here first, then restoring the limit, keeps any process
that uses tensorlink.chain as safe as one that does not; our contracts call at most three deep, far
inside the default limit.
"""

import sys

_limit = sys.getrecursionlimit()
try:
    import eth  # noqa: F401  (imported for its side effect, undone below)
    import py_ecc  # noqa: F401
finally:
    sys.setrecursionlimit(_limit)
