"""Compilation and a backtracking check for route path regexes.

Python's `re` backtracks without a step limit and runs on the event loop, so
one request path can stall every connection of a worker when a regex can
match the same text in exponentially many ways. `backtracking_risk` flags
the two shapes behind most such regexes:

- an unbounded repeat whose body is an unbounded repeat plus optional items
  only, as in `(a+)+`, `(a*)*` or `(\\w+\\s?)+`, because the outer repeat can
  split a run of characters between its iterations in many ways;
- an unbounded repeat of an alternation with two identical branches, as in
  `(a|a)*`.

A required item between the repeats, as in `(/[a-z]+)*`, separates the
iterations, so it is not flagged. Possessive repeats (`a++`) and atomic
groups (`(?>...)`) never backtrack and are not flagged either. The check is a
heuristic: it misses overlapping branches that are not identical, such as
`(\\w|\\d)*`, and polynomial cases such as `.*a.*a.*a`.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

# NOTE: the regex parser is a private module of CPython (re._parser since
# 3.11, sre_parse before), so its tree shape may change between versions.
# typeshed has no stubs for it, hence the import by name.
_PRIVATE = (
    ("re._parser", "re._constants")
    if sys.version_info >= (3, 11)
    else ("sre_parse", "sre_constants")
)
sre_parse: Any = importlib.import_module(_PRIVATE[0])
sre_constants: Any = importlib.import_module(_PRIVATE[1])

__all__ = ["backtracking_risk", "backtracking_warning", "compile_path_regex"]

_UNBOUNDED = sre_constants.MAXREPEAT
_BACKTRACKING_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT)
_SUBPATTERN = sre_constants.SUBPATTERN
_BRANCH = sre_constants.BRANCH


def compile_path_regex(pattern: str) -> re.Pattern[str]:
    """Compile `pattern`; raise ValueError with a message naming it on failure.

    Besides re.error, `re.compile` raises RecursionError for groups nested a
    few hundred deep, OverflowError for a repeat count such as
    `a{99999999999999999}`, and MemoryError for huge repeat bodies.
    """
    try:
        return re.compile(pattern)
    except re.error as error:
        reason = str(error)
    except RecursionError:
        reason = "groups are nested too deeply to compile"
    except OverflowError as error:
        reason = str(error)
    except MemoryError:
        reason = "the compiled expression would not fit in memory"
    raise ValueError(f'invalid regular expression "{_shorten(pattern)}": {reason}')


def backtracking_warning(pattern: str) -> tuple[str, str] | None:
    """Return the message and hint of a regex-backtracking warning, or None."""
    risk = backtracking_risk(pattern)
    if risk is None:
        return None
    message = (
        f'regular expression "{_shorten(pattern)}" may take exponential time '
        f"to match: {risk}"
    )
    hint = (
        "Python's re has no backtracking limit, so one request can stall the "
        "event loop; make the inner repeat possessive (a++) or atomic ((?>a+)), "
        "or remove the nesting"
    )
    return message, hint


def backtracking_risk(pattern: str) -> str | None:
    """Return why `pattern` may backtrack exponentially, or None.

    `pattern` should compile; a pattern that does not is left unchecked.
    """
    try:
        pending: list[Any] = [sre_parse.parse(pattern)]
        while pending:
            for op, argument in pending.pop():
                if op in _BACKTRACKING_REPEATS and argument[1] == _UNBOUNDED:
                    reason = _repeat_risk(argument[2])
                    if reason is not None:
                        return reason
                pending.extend(_children(op, argument))
    except (re.error, RecursionError, OverflowError):
        # Widths are computed recursively; a pattern too deep for that is
        # left unchecked rather than reported as a risk.
        return None
    return None


def _repeat_risk(body: Any) -> str | None:
    """Check the body of an unbounded backtracking repeat."""
    items = _flatten(body)
    required = {index for index, item in enumerate(items) if _min_width(item) > 0}
    for index, (op, argument) in enumerate(items):
        if op in _BACKTRACKING_REPEATS and argument[1] == _UNBOUNDED:
            # Every other item can match nothing, so the outer repeat can
            # split a run between its iterations in exponentially many ways.
            if required <= {index}:
                return "an unbounded repeat contains another unbounded repeat"
        if op == _BRANCH and _has_identical_branches(argument[1]):
            return "a repeated alternation has two identical branches"
    return None


def _flatten(body: Any) -> list[tuple[Any, Any]]:
    """Return the items of `body`, with plain groups replaced by their items."""
    items: list[tuple[Any, Any]] = []
    pending = list(reversed(list(body)))
    while pending:
        op, argument = pending.pop()
        if op == _SUBPATTERN:
            pending.extend(reversed(list(argument[-1])))
        else:
            items.append((op, argument))
    return items


def _has_identical_branches(branches: list[Any]) -> bool:
    # The parser moves a prefix common to all branches out of the alternation,
    # so `(a|a)` arrives as the literal "a" followed by two empty branches.
    # The text of a parsed branch lists its items, nested groups included.
    seen: set[str] = set()
    for branch in branches:
        text = repr(list(branch))
        if text in seen:
            return True
        seen.add(text)
    return False


def _min_width(item: tuple[Any, Any]) -> int:
    subpattern = sre_parse.SubPattern(sre_parse.State(), [item])
    return int(subpattern.getwidth()[0])


def _children(op: Any, argument: Any) -> list[Any]:
    """Return the sub-patterns directly under one parsed item.

    Groups, repeats, lookarounds and conditionals keep theirs in a tuple
    argument, an atomic group is its own argument, and an alternation keeps
    a list of branches.
    """
    if op == _BRANCH:
        return list(argument[1])
    parts = argument if isinstance(argument, tuple) else (argument,)
    return [part for part in parts if isinstance(part, sre_parse.SubPattern)]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
