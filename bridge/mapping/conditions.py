"""Conditions: exists/empty, comparisons, match shorthand, and all/any/not."""

from __future__ import annotations

import math
import re
import weakref
from typing import TYPE_CHECKING, Any

from bridge.mapping.fuse import Gen, emits, fuse
from bridge.mapping.runtime import MISSING, Env, is_empty
from bridge.mapping.yamlnodes import YNode, did_you_mean, join

if TYPE_CHECKING:
    from bridge.mapping.expressions import Cond, ExprCompiler, Fn

_ALWAYS_FALSE: Cond = emits(lambda env: False, lambda g: "False")
_ALWAYS_TRUE: Cond = emits(lambda env: True, lambda g: "True")

# A guard is what a condition requires of one top-level string field of the event:
# (field, the values it may have). `match: {type: identify}` has the guard
# ("type", {"identify"}). Callers check it before building an Env: at ingest every event
# is asked for its identity link, and most events fail on their type alone.
Guard = tuple[str, frozenset[str]]
_GUARDS: weakref.WeakKeyDictionary[Cond, Guard] = weakref.WeakKeyDictionary()
# Conditions that are their guard, no more: true exactly when the guard passes (a lone
# `match` of string values, compared as written). Where a caller has checked the guard,
# such a condition need not run (YamlMapping.apply).
_EXACT: weakref.WeakSet[Cond] = weakref.WeakSet()
_TOP_LEVEL = re.compile(r"\$\.([A-Za-z_][A-Za-z0-9_]*)")


def guard_of(cond: Cond) -> Guard | None:
    """The guard ``cond`` implies, if it implies one: when the event's field is not a
    string among the values, ``cond`` is certainly false."""
    return _GUARDS.get(cond)


def is_exact(cond: Cond) -> bool:
    """Whether ``cond`` holds exactly when its guard passes (see _EXACT)."""
    return cond in _EXACT


def passes(guard: Guard, event: dict[str, Any]) -> bool:
    value = event.get(guard[0])
    return type(value) is str and value in guard[1]


def _guarded(cond: Cond, guard: Guard | None, exact: bool = False) -> Cond:
    if guard is not None:
        _GUARDS[cond] = guard
        if exact:
            _EXACT.add(cond)
    return cond


def fuse_condition(cond: Cond) -> Cond:
    """``fuse`` for a condition at the root (a rule's, a drop's): it keeps its guard."""
    return _guarded(fuse(cond), guard_of(cond), is_exact(cond))


def compile_condition(c: ExprCompiler, node: YNode, ypath: str) -> Cond:
    from bridge.mapping.expressions import COMPARE_OPS, COND_KEYS

    v = node.value
    if isinstance(v, bool):
        return _ALWAYS_TRUE if v else _ALWAYS_FALSE
    if not isinstance(v, dict) or not v:
        c.diags.add(
            node,
            ypath,
            "expected a condition mapping (all, any, not, exists, empty, match, or value with an operator)",
        )
        return _ALWAYS_FALSE
    if not c.diags.check_keys(node, ypath, COND_KEYS, "a condition"):
        return _ALWAYS_FALSE
    logical = [k for k in ("all", "any", "not", "exists", "empty", "match") if k in v]
    ops = [k for k in COMPARE_OPS if k in v]
    if len(logical) + (1 if "value" in v or ops else 0) != 1:
        c.diags.add(
            node,
            ypath,
            "a condition needs exactly one of: all, any, not, exists, empty, match, or 'value' with one "
            "operator; combine several with 'all' or 'any'",
        )
        return _ALWAYS_FALSE
    if logical:
        key = logical[0]
        if "ignore_case" in v and key != "match":
            c.diags.add(node, join(ypath, "ignore_case"), "ignore_case only applies to comparisons and match")
        sub = v[key]
        sp = join(ypath, key)
        if key in ("all", "any"):
            if not sub.is_list or not sub.value:
                c.diags.add(sub, sp, f"'{key}' expects a non-empty list of conditions")
                return _ALWAYS_FALSE
            conds = tuple(compile_condition(c, item, join(sp, i)) for i, item in enumerate(sub.value))
            return conjunction(conds) if key == "all" else _any(conds)
        if key == "not":
            inner = compile_condition(c, sub, sp)
            return emits(lambda env: not inner(env), lambda g: f"(not {g.cond(inner)})")
        if key == "match":
            return _match(c, sub, sp, _ignore_case(c, v, ypath))
        fn = c.value(sub, sp)
        if key == "exists":
            return emits(lambda env: _exists(fn(env)), lambda g: _emit_exists(g.value(fn)))
        return emits(lambda env: is_empty(fn(env)), lambda g: g.empty(g.value(fn)))
    if "value" not in v:
        c.diags.add(node, ypath, f"operator {ops[0]!r} needs a 'value' to compare")
        return _ALWAYS_FALSE
    if len(ops) != 1:
        c.diags.add(
            node,
            ypath,
            "'value' needs exactly one operator: "
            + ", ".join(COMPARE_OPS)
            + (f" (found {', '.join(ops)})" if ops else ""),
        )
        return _ALWAYS_FALSE
    lhs = c.value(v["value"], join(ypath, "value"))
    return compare(c, lhs, ops[0], v[ops[0]], join(ypath, ops[0]), _ignore_case(c, v, ypath))


def _exists(x: Any) -> bool:
    return x is not MISSING and x is not None


def _emit_exists(x: str) -> str:
    return f"({x} is not M and {x} is not None)"


def _ignore_case(c: ExprCompiler, v: dict[str, YNode], ypath: str) -> bool:
    if "ignore_case" not in v:
        return False
    n = v["ignore_case"]
    if not isinstance(n.value, bool):
        c.diags.add(n, join(ypath, "ignore_case"), f"expected true or false, got {n.value!r}")
        return False
    return n.value


def _match(c: ExprCompiler, node: YNode, ypath: str, ignore_case: bool) -> Cond:
    if not node.is_map or not node.value:
        c.diags.add(node, ypath, "expected a mapping of path to value (or list of values), e.g. {type: track}")
        return _ALWAYS_FALSE
    conds = []
    for key, want in node.value.items():
        text = key if key.startswith("$") else "$." + key
        p = c.parse(text, want, join(ypath, key))
        if p is None:
            continue
        getter = c.path_fn(p)
        op = "in" if want.is_list else "equals"
        # match compares with the values as written (its guard relies on that)
        cond = compare(c, getter, op, want, join(ypath, key), ignore_case, literal_only=True)
        # Its guard is the whole condition: a string compared as written equals one of the
        # values exactly when it is among them (compare's `equals` and all-string `in`).
        guard = None if ignore_case else _match_guard(text, want)
        conds.append(_guarded(cond, guard, exact=True))
    return conjunction(tuple(conds))


def _match_guard(path: str, want: YNode) -> Guard | None:
    """`match` on a top-level field with string values (compared exactly) has a guard."""
    m = _TOP_LEVEL.fullmatch(path)
    if m is None:
        return None
    values = [x.plain() for x in want.value] if want.is_list else [want.plain()]
    if not values or not all(type(v) is str for v in values):
        return None
    return (m.group(1), frozenset(values))


def conjunction(conds: tuple[Cond, ...]) -> Cond:
    if len(conds) == 1:
        return conds[0]
    # All must hold, so any one's guard is the whole condition's.
    guard = next((g for f in conds if (g := guard_of(f)) is not None), None)

    # plain loops: a generator in all()/any() costs more than the check on this hot path
    def all_of(env: Env) -> bool:
        for f in conds:  # noqa: SIM110
            if not f(env):
                return False
        return True

    return _guarded(emits(all_of, lambda g: _emit_chain(g, conds, "and")), guard)


def _any(conds: tuple[Cond, ...]) -> Cond:
    if len(conds) == 1:
        return conds[0]
    # One must hold: guarded only if every branch guards the same field (values add up).
    guards = [g for f in conds if (g := guard_of(f)) is not None]
    guard: Guard | None = None
    if len(guards) == len(conds) and len({g[0] for g in guards}) == 1:
        guard = (guards[0][0], frozenset[str]().union(*(g[1] for g in guards)))

    def any_of(env: Env) -> bool:
        for f in conds:  # noqa: SIM110
            if f(env):
                return True
        return False

    return _guarded(emits(any_of, lambda g: _emit_chain(g, conds, "or")), guard)


def _emit_chain(g: Gen, conds: tuple[Cond, ...], op: str) -> str:
    """all_of / any_of as statements: each condition runs only while the answer is open.

    ``out`` holds the last condition's value as it is, not bool() of it: every reader of
    a condition's expression tests its truth (``if``, ``not``, the rules' ``when``), and a
    call to bool() per condition was a tenth of a drop rule's steps."""
    out = g.fresh()
    depth = g.depth
    for i, f in enumerate(conds):
        got = g.cond(f)
        g.line(f"{out} = {got}")
        if i < len(conds) - 1:  # after the last one the answer is its value, whatever it is
            g.line(f"if {'' if op == 'and' else 'not '}{out}:")
            g.depth += 1
    g.depth = depth
    return out


def _key(x: Any, fold: bool) -> Any:
    """A hashable key that keeps True apart from 1 (Python would not)."""
    t = type(x)
    if t is str:
        return ("s", x.lower() if fold else x)
    if t is bool:
        return ("b", x)
    if t is int or t is float:
        return ("n", x)
    if x is None:
        return ("z", None)
    return None


def _is_reference(raw: Any) -> bool:
    # As everywhere a value is read: "$..." is a path ($.x, $let.x, $link, $options.x);
    # a literal string that starts with "$" is written {literal: "$..."}.
    return isinstance(raw, str) and raw.startswith("$")


def _compare_values(lhs: Fn, rhs: Fn, equal: bool, fold: bool) -> Cond:
    """``equals`` another value of the same event: same type and value. Two absent values,
    or two objects, are never equal, so a missing field cannot match a missing field."""

    def same(env: Env) -> bool:
        a = _key(lhs(env), fold)
        return a is not None and a[1] is not None and a == _key(rhs(env), fold)

    if equal:
        return same
    return lambda env: not same(env)


def _is_num(x: Any) -> bool:
    t = type(x)
    return t is int or t is float


# `is`: JSON types by name. A boolean is not a number (Python says True == 1).
JSON_TYPES: dict[str, frozenset[type]] = {
    "string": frozenset({str}),
    "number": frozenset({int, float}),
    "integer": frozenset({int}),
    "boolean": frozenset({bool}),
    "object": frozenset({dict}),
    "array": frozenset({list}),
    "null": frozenset({type(None)}),
}


def _is_type(c: ExprCompiler, lhs: Fn, rhs: YNode, ypath: str) -> Cond:
    """``{value: X, is: string}`` or ``is: [string, number]``: X is one of these JSON types
    (absent is none of them)."""
    names = [x.plain() for x in rhs.value] if rhs.is_list else [rhs.plain()]
    wanted: set[type] = set()
    for name in ("null" if n is None else n for n in names):  # YAML reads a bare null as None
        if not isinstance(name, str) or name not in JSON_TYPES:
            c.diags.add(rhs, ypath, f"'is' expects JSON type names ({', '.join(JSON_TYPES)}), got {name!r}")
            return _ALWAYS_FALSE
        wanted |= JSON_TYPES[name]
    types = frozenset(wanted)
    return emits(lambda env: type(lhs(env)) in types, lambda g: f"(type({g.value(lhs)}) in {g.bind(types)})")


def compare(c: ExprCompiler, lhs: Fn, op: str, rhs: YNode, ypath: str, fold: bool, literal_only: bool = False) -> Cond:
    raw = rhs.value
    if op == "is":
        return _is_type(c, lhs, rhs, ypath)
    if op in ("equals", "not_equals") and not literal_only and (rhs.is_map or _is_reference(raw)):
        return _compare_values(lhs, c.value(rhs, ypath), op == "equals", fold)
    if op in ("in", "not_in"):
        values: frozenset[Any]
        if isinstance(raw, str):
            lk = c.lookup(rhs, ypath)
            if lk is None:
                return _ALWAYS_FALSE
            fold = fold or lk.ignore_case
            keys = lk.values if lk.values is not None else tuple(lk.table or ())
            values = frozenset(_key(k, fold) for k in keys)
        elif rhs.is_list:
            if any(x.is_map or x.is_list for x in raw):
                # Objects and lists equal nothing (see ``_key``): listed, they would match
                # every object or list the event holds.
                c.diags.add(rhs, ypath, f"'{op}' expects a list of strings, numbers, booleans or null")
                return _ALWAYS_FALSE
            values = frozenset(_key(x.plain(), fold) for x in raw)
        else:
            c.diags.add(rhs, ypath, f"'{op}' expects a list of values or the name of a lookup")
            return _ALWAYS_FALSE
        if op == "in" and all(k is not None and k[0] == "s" for k in values):
            # all-string sets (the usual case) skip the type-tagging of _key
            strings = frozenset(k[1] for k in values)
            lower = ".lower()" if fold else ""

            def emit_in(g: Gen) -> str:
                x = g.value(lhs)
                return f"(type({x}) is str and {x}{lower} in {g.bind(strings)})"

            if fold:
                return emits(lambda env: type(x := lhs(env)) is str and x.lower() in strings, emit_in)
            return emits(lambda env: type(x := lhs(env)) is str and x in strings, emit_in)
        if op == "in":
            return lambda env: _key(lhs(env), fold) in values
        return lambda env: _key(lhs(env), fold) not in values
    if op in ("equals", "not_equals"):
        want = _key(rhs.plain(), fold)
        if want is None:
            c.diags.add(rhs, ypath, f"'{op}' expects a string, number, boolean or null")
            return _ALWAYS_FALSE
        if op == "equals" and type(want[1]) is str and not fold:
            text = want[1]
            return emits(lambda env: lhs(env) == text, lambda g: f"({g.value(lhs)} == {g.literal(text)})")
        if op == "equals" and type(want[1]) is bool:
            # Inlined in fused code: an option's flag (`$options.anonymous_ids equals true`) is
            # asked of every event. True and False are singletons, so `is` is _key's typed
            # equality (1 is not True).
            flag: bool = want[1]
            return emits(lambda env: lhs(env) is flag, lambda g: f"({g.value(lhs)} is {flag!r})")
        if op == "equals":
            return lambda env: _key(lhs(env), fold) == want
        return lambda env: _key(lhs(env), fold) != want
    if op in ("prefix", "suffix", "contains"):
        if not isinstance(raw, str):
            c.diags.add(rhs, ypath, f"'{op}' expects a string, got {raw!r}")
            return _ALWAYS_FALSE
        needle = raw.lower() if fold else raw
        if op == "contains":

            def contains(env: Env) -> bool:
                x = lhs(env)
                if type(x) is str:
                    return needle in (x.lower() if fold else x)
                if type(x) is list:
                    return _key(needle, fold) in {_key(i, fold) for i in x}
                return False

            return contains
        method = str.startswith if op == "prefix" else str.endswith

        def affix(env: Env) -> bool:
            x = lhs(env)
            return type(x) is str and method(x.lower() if fold else x, needle)

        if fold:
            return affix
        # Inlined in fused code: a rule may ask it of every event (a reserved name's prefix).
        name = "startswith" if op == "prefix" else "endswith"

        def emit_affix(g: Gen) -> str:
            x = g.value(lhs)
            return f"(type({x}) is str and {x}.{name}({g.literal(needle)}))"

        return emits(affix, emit_affix)
    if not _is_num(raw) or isinstance(raw, bool):
        c.diags.add(rhs, ypath, f"'{op}' expects a number, got {raw!r}")
        return _ALWAYS_FALSE
    if not math.isfinite(raw):
        # YAML's .nan makes every comparison false, and .inf every one the same: never meant.
        c.diags.add(rhs, ypath, f"'{op}' expects a finite number, got {raw!r}")
        return _ALWAYS_FALSE
    bound = raw
    cmp = {"gt": ">", "gte": ">=", "lt": "<"}.get(op, "<=")

    def emit_number(g: Gen) -> str:
        x = g.value(lhs)
        return f"((type({x}) is int or type({x}) is float) and {x} {cmp} {g.bind(bound)})"

    if op == "gt":
        return emits(lambda env: _is_num(x := lhs(env)) and x > bound, emit_number)
    if op == "gte":
        return emits(lambda env: _is_num(x := lhs(env)) and x >= bound, emit_number)
    if op == "lt":
        return emits(lambda env: _is_num(x := lhs(env)) and x < bound, emit_number)
    return emits(lambda env: _is_num(x := lhs(env)) and x <= bound, emit_number)


__all__ = ["compile_condition", "did_you_mean"]
