"""PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup at a cost linear in the module name.

PEFT gives a module the value of the first key for which ``re.match(rf"(.*\\.)?({key})$", module)``
matches. Run with Python's backtracking ``re``, an uploaded key costs exponential time (``(a|aa)*c``)
or polynomial time (``.*.*.*…x``) in the name's length, so deft runs ``re`` only on *plain* keys
(letters, digits, ``_``, ``-``, ``.`` and ``\\.``: a fixed-width suffix), and those are looked up in
an index (one dict probe per group of keys with the same width and wildcard positions). Any
other key is parsed by Python's own regex parser (the same syntax and errors as PEFT), compiled to a
Thompson NFA and simulated one character at a time, memoising the state sets (a lazy DFA): the same
answers as ``re`` with no backtracking at all. Constructs without an NFA (backreferences,
lookarounds, atomic groups, inline flags) are refused with the key named.

Limits (:class:`AdapterFormatError` naming the field beyond them): :data:`MAX_PATTERN_KEYS` keys,
:data:`MAX_PATTERN_CHARS` characters a key, :data:`MAX_PATTERN_STATES` NFA states a key, and
:data:`MAX_MATCH_WORK` units of work over all the lookups of one table (a plain key's check is a
few units; an NFA run costs 3 units a character plus one a state visited on a memo miss), so the
worst table costs about a second, while a diffusers file's hundreds of keys cost a fraction of it.
"""

from __future__ import annotations

import operator
import re
import re._constants as sre
import re._parser as sre_parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from deft_runtime.errors import AdapterFormatError, shorten
from deft_runtime.formats.fields import field_name, mapping

MAX_PATTERN_KEYS = 4096
MAX_PATTERN_CHARS = 256
MAX_PATTERN_STATES = 2048
#: Work units (about 0.2 µs each) all the lookups of one table may cost: about a second at most.
MAX_MATCH_WORK = 5_000_000
_MEMO_ENTRIES = 100_000
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_\-.]|\\\.)+")
_BEGIN, _END, _END_STRING = 1, 2, 4  # position context bits for anchors
_ANCHORS = {
    sre.AT_BEGINNING: _BEGIN,
    sre.AT_BEGINNING_STRING: _BEGIN,
    sre.AT_END: _END,
    sre.AT_END_STRING: _END_STRING,
}
_REFUSED = {
    sre.GROUPREF: "backreference",
    sre.GROUPREF_EXISTS: "backreference",
    sre.ASSERT: "lookaround",
    sre.ASSERT_NOT: "lookaround",
    sre.ATOMIC_GROUP: "atomic group",
    sre.POSSESSIVE_REPEAT: "possessive quantifier",
}
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}
T = TypeVar("T")
# NFA states: ("char", predicate, next) | ("split", nexts) | ("assert", context bit, next) | ("match",)
State = tuple[Any, ...]


class _Refused(Exception):
    """A key the NFA cannot evaluate; becomes an AdapterFormatError naming the key."""


def _in_range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda c: lo <= ord(c) <= hi


def _char_predicate(op: Any, av: Any) -> Callable[[str], bool]:
    if op is sre.LITERAL:
        return chr(av).__eq__
    if op is sre.NOT_LITERAL:
        return chr(av).__ne__
    if op is sre.ANY:
        return "\n".__ne__
    tests: list[Callable[[str], bool]] = []
    negate = False
    for item_op, item in av:  # op is IN: a character class
        if item_op is sre.NEGATE:
            negate = True
        elif item_op is sre.LITERAL:
            tests.append(chr(item).__eq__)
        elif item_op is sre.RANGE:
            tests.append(_in_range(*item))
        elif item_op is sre.CATEGORY and item in _CATEGORIES:
            tests.append(_CATEGORIES[item])
        else:
            raise _Refused(f"character-class item {item_op}")
    return lambda c: any(t(c) for t in tests) != negate


class _Builder:
    """Thompson construction, back to front: each node is compiled with its continuation state."""

    def __init__(self) -> None:
        self.states: list[State] = [("match",)]

    def add(self, state: State) -> int:
        if len(self.states) >= MAX_PATTERN_STATES:
            raise _Refused("size")
        self.states.append(state)
        return len(self.states) - 1

    def sequence(self, nodes: Any, nxt: int) -> int:
        for op, av in reversed(list(nodes)):
            nxt = self.node(op, av, nxt)
        return nxt

    def node(self, op: Any, av: Any, nxt: int) -> int:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return self.add(("char", _char_predicate(op, av), nxt))
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise _Refused("inline flag")
            return self.sequence(body, nxt)
        if op is sre.BRANCH:
            return self.add(("split", tuple(self.sequence(alt, nxt) for alt in av[1])))
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same yes/no answer
            lo, hi, body = av
            return self.repeat(lo, hi, body, nxt)
        if op is sre.AT and av in _ANCHORS:
            return self.add(("assert", _ANCHORS[av], nxt))
        raise _Refused(_REFUSED.get(op, "word boundary" if op is sre.AT else str(op)))

    def repeat(self, lo: int, hi: int, body: Any, nxt: int) -> int:
        unbounded = hi == sre.MAXREPEAT
        if lo + (0 if unbounded else hi - lo) > MAX_PATTERN_STATES:
            raise _Refused("size")
        if unbounded:
            start = loop = self.add(("split", ()))
            self.states[loop] = ("split", (self.sequence(body, loop), nxt))
        else:
            start = nxt
            for _ in range(hi - lo):
                start = self.add(("split", (self.sequence(body, start), nxt)))
        for _ in range(lo):
            start = self.sequence(body, start)
        return start


@dataclass
class _Nfa:
    states: list[State]
    start: int
    budget: list[int]  # shared with the table: remaining state visits
    _closures: dict[tuple[frozenset[int], int], frozenset[int]] = field(default_factory=dict)
    _moves: dict[tuple[frozenset[int], str, int], frozenset[int]] = field(default_factory=dict)

    def _spend(self, work: int) -> None:
        self.budget[0] -= work
        if self.budget[0] < 0:
            raise _Refused("budget")
        if len(self._closures) + len(self._moves) > _MEMO_ENTRIES:
            self._closures.clear()
            self._moves.clear()

    def _closure(self, seeds: frozenset[int], context: int) -> frozenset[int]:
        if (hit := self._closures.get((seeds, context))) is not None:
            return hit
        stack, seen = list(seeds), set()
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                state = self.states[i]
                if state[0] == "split":
                    stack.extend(state[1])
                elif state[0] == "assert" and context & state[1]:
                    stack.append(state[2])
        self._spend(len(seen))
        result = frozenset(i for i in seen if self.states[i][0] in ("char", "match"))
        self._closures[(seeds, context)] = result
        return result

    def _step(self, current: frozenset[int], c: str) -> frozenset[int]:
        self._spend(len(current))
        states = (self.states[i] for i in current)
        return frozenset(s[2] for s in states if s[0] == "char" and s[1](c))

    def match(self, name: str) -> bool:
        """``re.match(pattern, name) is not None``, in O(len(name)) memoised steps."""
        n = len(name)
        self._spend(3 * (n + 1))  # one memo look-up a character, even when every one hits

        def context(i: int) -> int:
            at_end = i == n or (i == n - 1 and name[-1] == "\n")
            return (_BEGIN if i == 0 else 0) | (_END if at_end else 0) | (_END_STRING if i == n else 0)

        current = self._closure(frozenset({self.start}), context(0))
        for i, c in enumerate(name):
            if 0 in current:  # state 0 is the match state: a prefix matched, as re.match accepts
                return True
            ctx = 0 if i + 2 < n else context(i + 1)  # anchors only hold at the ends
            nxt = self._moves.get((current, c, ctx))
            if nxt is None:
                nxt = self._closure(self._step(current, c), ctx)
                self._moves[(current, c, ctx)] = nxt
            if not nxt:
                return False
            current = nxt
        return 0 in current


def _plain_matcher(key: str, budget: list[int]) -> Callable[[str], bool]:
    """``re.match(rf"(.*\\.)?({key})$", name)`` for a fixed-width key, in one O(k) ``fullmatch``.

    The name's suffix of the key's width must match the key, and what precedes it must be empty or
    end with ``.`` (``(.*\\.)?``, whose ``.*`` crosses no newline); ``$`` also matches before a final
    newline. No backtracking over the name's positions, whatever the key.
    """
    body = re.compile(key)
    width = len(key) - key.count("\\.")
    cost = 5 + width // 16  # a call, then a compare a character

    def match(name: str) -> bool:
        budget[0] -= cost
        if budget[0] < 0:
            raise _Refused("budget")
        ends = (len(name), len(name) - 1) if name.endswith("\n") else (len(name),)
        for end in ends:
            start = end - width
            if start < 0 or not body.fullmatch(name, start, end):
                continue
            if start == 0 or (name[start - 1] == "." and "\n" not in name[:start]):
                return True
        return False

    return match


def _plain_atoms(key: str) -> list[str | None]:
    """A plain key's characters, ``None`` for a raw ``.`` (any character but a newline)."""
    atoms: list[str | None] = []
    escaped = False
    for c in key:
        if escaped or c != "\\":
            atoms.append(None if c == "." and not escaped else c)
        escaped = c == "\\" and not escaped
    return atoms


class _PlainIndex:
    """Plain keys bucketed by (width, wildcard positions): one dict probe a bucket, not a compare a key.

    A name matches a key of width ``w`` when its last ``w`` characters, read at the key's
    non-wildcard positions, equal the key's, and the character before them (if any) is ``.``. Only
    for names without a newline (module names never hold one); :meth:`PatternTable.lookup` checks
    the others key by key.
    """

    def __init__(self, budget: list[int]) -> None:
        self.budget = budget
        self.buckets: dict[
            tuple[int, tuple[int, ...]], tuple[Callable[[str], object], dict[object, int]]
        ] = {}

    def add(self, index: int, key: str) -> None:
        atoms = _plain_atoms(key)
        wild = tuple(i for i, a in enumerate(atoms) if a is None)
        if (len(atoms), wild) not in self.buckets:
            keep = [i for i, a in enumerate(atoms) if a is not None]
            getter: Callable[[str], object] = operator.itemgetter(*keep) if keep else str.__len__
            self.buckets[(len(atoms), wild)] = (getter, {})
        getter, first = self.buckets[(len(atoms), wild)]
        first.setdefault(getter("".join(a or "." for a in atoms)), index)

    def first_match(self, name: str) -> int | None:
        """The smallest index of a key matching ``name`` (which holds no newline), or None."""
        best, n = None, len(name)
        for (width, _), (getter, first) in self.buckets.items():
            start = n - width
            self.budget[0] -= 4  # a bucket visited
            if start < 0 or (start and name[start - 1] != "."):
                continue
            self.budget[0] -= 4 + width // 4  # a slice, a tuple and a hash of the suffix
            index = first.get(getter(name[start:]))
            if index is not None and (best is None or index < best):
                best = index
        if self.budget[0] < 0:
            raise _Refused("budget")
        return best


def _compile_key(key: str, budget: list[int]) -> Callable[[str], bool]:
    """A matcher equivalent to ``re.match(rf"(.*\\.)?({key})$", name)``; raises re.error or _Refused."""
    if _PLAIN_KEY.fullmatch(key):
        return _plain_matcher(key, budget)
    parsed = sre_parse.parse(rf"(.*\.)?({key})$")
    if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
        raise _Refused("inline flag")
    builder = _Builder()
    start = builder.sequence(parsed, 0)
    return _Nfa(builder.states, start, budget).match


@dataclass
class PatternTable(Generic[T]):
    """An ordered ``{key: value}`` pattern table (PEFT semantics: the first matching key wins)."""

    field: str
    entries: list[tuple[str, Callable[[str], bool], T]]
    budget: list[int]
    plain: _PlainIndex
    regex: list[tuple[int, Callable[[str], bool]]]  # the keys that are not plain, in order

    @classmethod
    def parse(
        cls,
        value: object,
        field: str,
        convert: Callable[[object, str], T] = lambda v, _: v,  # type: ignore[assignment,return-value]
    ) -> PatternTable[T]:
        """Check ``value`` (a JSON object or null), every key's size and syntax, and every value."""
        table = mapping(value, shorten(field))
        if len(table) > MAX_PATTERN_KEYS:
            raise AdapterFormatError(
                f"{field} has {len(table)} keys; at most {MAX_PATTERN_KEYS} are accepted"
            )
        budget = [MAX_MATCH_WORK]
        entries = [
            (key, cls._matcher(field, key, budget), convert(v, field_name(key, field)))
            for key, v in table.items()
        ]
        plain, regex = _PlainIndex(budget), []
        for index, (key, matches, _) in enumerate(entries):
            if _PLAIN_KEY.fullmatch(key):
                plain.add(index, key)
            else:
                regex.append((index, matches))
        return cls(field, entries, budget, plain, regex)

    @staticmethod
    def _matcher(field: str, key: str, budget: list[int]) -> Callable[[str], bool]:
        where = f"{field} key {shorten(key)}"
        if len(key) > MAX_PATTERN_CHARS:
            raise AdapterFormatError(
                f"{where} has {len(key)} characters; at most {MAX_PATTERN_CHARS} are accepted"
            )
        try:
            return _compile_key(key, budget)
        except (re.error, OverflowError, RecursionError) as e:
            raise AdapterFormatError(
                f"{where} is not a valid regex: {shorten(str(e), 120, quote=False)}"
            ) from e
        except _Refused as e:
            raise AdapterFormatError(_refusal(where, str(e))) from e

    def lookup(self, module: str) -> T | None:
        """The value of the first key matching ``module`` (as PEFT's ``get_pattern_key``), or None."""
        try:
            if "\n" in module:  # never a real module name; checked key by key, still bounded
                return next((value for _, matches, value in self.entries if matches(module)), None)
            best = self.plain.first_match(module)
            for index, matches in self.regex:
                if best is not None and index > best:
                    break
                if matches(module):
                    return self.entries[index][2]
            return None if best is None else self.entries[best][2]
        except _Refused as e:
            raise AdapterFormatError(
                f"{self.field}: matching its keys against the adapter's module names took more than "
                f"{MAX_MATCH_WORK} steps; use module names or simpler regexes"
            ) from e


def _refusal(where: str, what: str) -> str:
    if what == "size":
        return f"{where} is too complex (more than {MAX_PATTERN_STATES} states); use module names or simpler regexes"
    return (
        f"{where} uses a {what}, which deft does not evaluate; use module names or regexes made of "
        "characters, '.', classes [...], *, +, ?, {m,n}, | and groups"
    )
