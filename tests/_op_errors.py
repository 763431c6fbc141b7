"""Argument checks of the compiled operators: each case changes one argument of a valid call."""
import pytest


def expect_errors(op, good, changes):
    """``op(*good)`` runs; for each ``(index, value, message)`` of ``changes``, ``op`` called with ``good``'s
    argument ``index`` replaced by ``value`` raises a RuntimeError matching ``message``."""
    op(*good)
    for index, value, message in changes:
        args = good[:index] + (value,) + good[index + 1:]
        with pytest.raises(RuntimeError, match=message):
            op(*args)
