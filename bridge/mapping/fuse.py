"""Fuse a tree of compiled closures into one generated Python function.

The expression compiler builds one small closure per node, and a rule body runs dozens of
them per event: on CPython each call costs more than the work inside most of them (paths,
``first``, objects, let lookups). Closures for those nodes also carry an *emitter*, which
writes the same logic as Python statements. ``fuse`` asks the root for its statements,
children first, and compiles them into one function. A node without an emitter (steps,
conditions, templates, ...) is called as the closure it is, from inside the fused code, so
the closures stay the one definition of what every node means; an emitter only restates
its own closure, line for line, next to it in expressions.py.

Anything that goes wrong while generating (an unexpected node, Python's limit on nesting)
leaves the closure tree as it was: fusing is an optimisation, never a requirement.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, TypeVar

from bridge.mapping.runtime import MISSING, Env

Fn = Callable[[Env], Any]
F = TypeVar("F", bound=Callable[..., Any])

# Emitters write Python statements for their node and return an expression (a local
# variable or a bound constant) holding its value. Stored on the closure under this name.
EMITTER = "_bridge_emit"
# Pipe steps take the value too: their emitters get its expression and return the step's.
STEP_EMITTER = "_bridge_emit_step"
# Python refuses source nested about 100 levels deep. Nodes below this depth are called as
# closures instead of inlined; a long chain (an `all` of 100 conditions) may still go past
# the limit, and then the whole root stays a closure tree (see fuse).
MAX_DEPTH = 12
# Depth a let's inlined statements may take; deeper down, the fused let is called instead
# (inlining it past MAX_DEPTH would turn its nodes back into closure calls, slower still).
LET_DEPTH = 6
# Fused code may be switched off (tests compare both; an operator could too).
ENABLED = True
_EMPTY_TYPES = frozenset({str, list, dict})
# The types whose falsy values are empty (with MISSING): ``not v`` is false for every other
# value, so the common case, a value that is there, is decided by ``v is M or not v``.
_EMPTY_WHEN_FALSY = frozenset({str, list, dict, type(None)})
# What a hoisted value that is not a dict is read as (Gen.hoisted_keys): no keys, and
# read-only, since every generated function shares it.
_NO_KEYS: MappingProxyType[str, Any] = MappingProxyType({})
# A path prefix of the event read this many times in one function is read once, at its
# start (Gen.hoisted).
HOIST_USES = 2
_ids = itertools.count()
_USES_LETS = re.compile(r"\bL\b")


def emits(fn: F, emitter: Callable[[Gen], str]) -> F:
    """Attach ``emitter`` (the statements equivalent to ``fn``) to the closure ``fn``."""
    setattr(fn, EMITTER, emitter)
    return fn


def emits_step(step: F, emitter: Callable[[Gen, str], str]) -> F:
    """Attach ``emitter`` to the pipe step ``step`` (called with the value's expression)."""
    setattr(step, STEP_EMITTER, emitter)
    return step


class Gen:
    """The function being generated: its lines, its locals and its bound constants."""

    def __init__(self, inline_lets: bool = True, hoist: frozenset[tuple[str, ...]] = frozenset()) -> None:
        self.inline_lets = inline_lets
        self.lines: list[str] = []
        self.depth = 1
        self.names: dict[int, str] = {}
        self.bound: dict[str, Any] = {
            "M": MISSING,
            "EMPTY_TYPES": _EMPTY_TYPES,
            "EMPTY_WHEN_FALSY": _EMPTY_WHEN_FALSY,
            "NO_KEYS": _NO_KEYS,
        }
        # Event path prefixes (key names from the root) read by this function's paths, as
        # often as its source reads them, by the let whose inlined code reads them ("" for
        # none, see ``scope``); a second generation hoists those in ``hoist`` (prefix_uses).
        self._prefix_reads: dict[tuple[str, ...], Counter[str]] = {}
        self.scope = ""
        self.hoist = hoist
        self.prelude: list[str] = []
        self._hoisted: dict[tuple[str, ...], str] = {}
        self._hoisted_keys: dict[tuple[str, ...], str] = {}
        self._fresh = itertools.count()
        self._inlined: set[str] = set()
        # Set by an emitter whose code reads the event as a dict without checking: the
        # function then starts by handing any other event to the closures (see _generate).
        self.event_is_dict = False
        # Expressions that are never M (a fresh container, a bound constant): an object or
        # a list that stores one needs no test for it (see expressions._emit_fields).
        self.present: set[str] = set()
        # Locals an emitter made for its own value and returned, which nothing else reads:
        # ``assign`` hands one over as it is instead of copying it (``v5 = v4``).
        self.owned: set[str] = set()
        # {("let", name) or ("path", segments): (the local holding its value, the depth it
        # was read at)}: a later read at that depth or deeper, before the source leaves that
        # block, is on a path that went through the first read, so it uses the local instead
        # of reading the let cache again (a drop rule read customer_id three times, 8 steps
        # each) or the event again (an `if` reads `$.traits.id` to test it, then to give it).
        self._reads: dict[tuple[str, Any], tuple[str, int]] = {}

    def inline_once(self, name: str) -> bool:
        """True the first time ``name`` (a let) asks to be inlined into this function, if
        there is depth left for its statements; then False: one copy of each let's code."""
        if not self.inline_lets or name in self._inlined or self.depth > MAX_DEPTH - LET_DEPTH:
            return False
        self._inlined.add(name)
        return True

    def read_prefix(self, prefix: tuple[str, ...]) -> None:
        """A path of this function's source reads the event's ``prefix``."""
        self._prefix_reads.setdefault(prefix, Counter())[self.scope] += 1

    def prefix_uses(self) -> dict[tuple[str, ...], int]:
        """How often each prefix is read, counting all the reads inside one inlined let as
        one: that code runs only when no function before this one needed the let (the
        drops compute `customer_id`; a rule body's copy reads nothing), so hoisting a
        prefix only it reads, twice, read the prefix for every event instead of never."""
        return {p: sum(n if scope == "" else 1 for scope, n in by.items()) for p, by in self._prefix_reads.items()}

    def fresh(self) -> str:
        return f"v{next(self._fresh)}"

    def bind(self, obj: Any) -> str:
        """A global name for ``obj`` in the generated module (one per object)."""
        name = self.names.get(id(obj))
        if name is None:
            name = self.names[id(obj)] = f"b{len(self.names)}"
            self.bound[name] = obj
        return name

    def literal(self, key: Any) -> str:
        """``key`` as source: a literal for str and int, else a bound name."""
        return repr(key) if type(key) in (str, int) else self.bind(key)

    def hoisted(self, prefix: tuple[str, ...]) -> str:
        """A local holding the event's value at ``prefix`` (or M), read once at the start
        of the function. Only the event's own keys are hoisted: mapping never changes the
        event (a change goes to a copy, see compiler._set_path), and a read cannot raise,
        so reading it first gives what reading it where it is used would."""
        name = self._hoisted.get(prefix)
        if name is None:
            key = self.literal(prefix[-1])
            parent = "e" if len(prefix) == 1 else self.hoisted_keys(prefix[:-1])
            expr = f"{parent}.get({key}, M)"
            name = self._hoisted[prefix] = f"h{len(self._hoisted)}"
            self.prelude.append(f"    {name} = {expr}")
        return name

    def hoisted_keys(self, prefix: tuple[str, ...]) -> str:
        """A local to read the keys of the hoisted value at ``prefix`` from: the value when
        it is a dict, else NO_KEYS. ``d.get(k, M)`` then gives what ``h.get(k, M) if
        type(h) is dict else M`` gives, without testing the type at every read (a page
        rule reads seven keys of `properties`, each test seven interpreter steps)."""
        name = self._hoisted_keys.get(prefix)
        if name is None:
            value = self.hoisted(prefix)
            name = self._hoisted_keys[prefix] = f"d{len(self._hoisted_keys)}"
            self.prelude.append(f"    {name} = {value} if type({value}) is dict else NO_KEYS")
        return name

    def line(self, text: str) -> None:
        if self._reads:
            self._forget_reads_deeper_than(self.depth)
        self.lines.append("    " * self.depth + text)

    def let_read(self, name: str) -> str | None:
        """The local holding let ``name``, if every path to here read it already."""
        return self._read(("let", name))

    def let_was_read(self, name: str, local: str) -> None:
        """``local`` holds let ``name`` from here on, in this block and the ones in it."""
        self._reads["let", name] = (local, self.depth)

    def path_read(self, segs: tuple[Any, ...]) -> str | None:
        """The local holding the event's value at ``segs``, if every path to here read it
        already (the event never changes while it is mapped, see ``hoisted``)."""
        return self._read(("path", segs))

    def path_was_read(self, segs: tuple[Any, ...], local: str) -> None:
        """``local`` holds the event's value at ``segs`` from here on, as ``let_was_read``;
        whoever gets it may not assign to it (``assign`` copies it)."""
        self._reads["path", segs] = (local, self.depth)

    def _read(self, key: tuple[str, Any]) -> str | None:
        self._forget_reads_deeper_than(self.depth)
        known = self._reads.get(key)
        return known[0] if known is not None else None

    def _forget_reads_deeper_than(self, depth: int) -> None:
        # A line at a shallower depth closes the block a value was read in (or starts its
        # `else`, `except`, ...): past it, the read may not have happened.
        stale = [key for key, (_, at) in self._reads.items() if at > depth]
        for key in stale:
            del self._reads[key]

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.line(header)
        self.depth += 1
        mark = len(self.lines)
        try:
            yield
        finally:
            if len(self.lines) == mark:
                self.line("pass")
            self.depth -= 1

    def value(self, fn: Fn) -> str:
        """Emit ``fn``'s statements (or a call to it) and return its value's expression."""
        emitter = getattr(fn, EMITTER, None)
        if emitter is None or self.depth > MAX_DEPTH:
            out = self.fresh()
            self.line(f"{out} = {self.bind(fn)}(env)")
            return out
        result: str = emitter(self)
        return result

    def cond(self, cond: Callable[[Env], bool]) -> str:
        """Like ``value``, for a condition: an expression that is True or False."""
        return self.value(cond)

    def step(self, step: Callable[[Any, Env], Any], value: str) -> str:
        """The expression for ``step`` applied to the value in ``value``."""
        emitter = getattr(step, STEP_EMITTER, None)
        if emitter is None:
            return f"{self.bind(step)}({value}, env)"
        result: str = emitter(self, value)
        return result

    def assign(self, fn: Fn) -> str:
        """Like ``value``, but always a fresh local the caller may reassign."""
        got = self.value(fn)
        if got in self.owned:
            self.owned.discard(got)  # the caller's now, as it is: nothing else reads it
            return got
        out = self.fresh()
        self.line(f"{out} = {got}")
        return out

    @staticmethod
    def empty(v: str) -> str:
        """The test ``runtime.is_empty(v)``, inline. ``not M`` would call MISSING's
        ``__bool__``, a Python frame, so M is tested first, by identity."""
        return f"({v} is M or (not {v} and type({v}) in EMPTY_WHEN_FALSY))"


def fuse(fn: Fn) -> Fn:
    """One generated function equivalent to the closure tree ``fn``, or ``fn`` itself."""
    if not ENABLED or getattr(fn, EMITTER, None) is None:
        return fn
    # Inlined lets nest their statements deeper: past Python's limit on nesting, the
    # function is generated again with every let called instead.
    for inline_lets in (True, False):
        first = Gen(inline_lets)
        fused = _generate(fn, first)
        if fused is None:
            continue
        # Generated again, reading once what the first generation's paths read often:
        # a rule reads `context` five or six times, each a dict lookup and its checks.
        hoist = frozenset(p for p, n in first.prefix_uses().items() if n >= HOIST_USES)
        if hoist:
            again = _generate(fn, Gen(inline_lets, hoist))
            if again is not None:
                return again
        return fused
    return fn


def _generate(fn: Fn, gen: Gen) -> Fn | None:
    try:
        result = gen.value(fn)
        # Every caller maps a JSON object, so emitters may read it as a dict without a
        # check per path; anything else (never seen) runs the closures, which check.
        guard = [f"    if type(e) is not dict: return {gen.bind(fn)}(env)"] if gen.event_is_dict else []
        # The lets' cache only where some line may read it (a word L anywhere, even inside
        # a string, keeps it): most conditions read none.
        lets = ["    L = env.lets"] if any(_USES_LETS.search(text) for text in gen.lines) else []
        source = "\n".join(
            [
                "def fused(env):",
                "    e = env.event",
                *guard,
                *lets,
                *gen.prelude,
                *gen.lines,
                f"    return {result}",
            ]
        )
        namespace: dict[str, Any] = dict(gen.bound)
        # Only repr()s of str and int and bound names reach the source (Gen.literal).
        exec(compile(source, f"<mapping fused {next(_ids)}>", "exec"), namespace)
    except Exception:  # fusing is only ever an optimisation: any failure keeps the closures
        return None
    fused: Fn = namespace["fused"]
    fused.__doc__ = source  # what runs, for anyone debugging a mapping
    return fused


def is_fused(fn: Any) -> bool:
    return getattr(fn, "__name__", "") == "fused" and str(getattr(fn, "__doc__", "")).startswith("def fused")
