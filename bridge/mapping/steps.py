"""Pipe steps: value transforms applied in order after an expression's head."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from bridge.mapping.fuse import Gen, emits_step
from bridge.mapping.runtime import (
    COERCIONS,
    MILLIS_THRESHOLD,
    MISSING,
    CoercionError,
    DropEvent,
    Env,
    FailEvent,
    clone,
    is_empty,
    short,
    to_datetime,
    to_string,
)
from bridge.mapping.yamlnodes import YNode, did_you_mean, join, kind_of

if TYPE_CHECKING:
    from bridge.mapping.expressions import ExprCompiler

Step = Callable[[Any, Env], Any]

# step name -> parameters it accepts besides its own key
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    "case": (),
    "trim": (),
    "replace": ("with", "ignore_case"),
    "lookup": ("default", "keep_unmatched", "ignore_case"),
    "to": ("on_error", "reason"),
    "tz_offset": ("on_error", "reason"),
    "not_after": (),
    "flatten": ("separator", "arrays"),
    "pick": (),
    "omit": (),
    "rename": (),
    "compact": (),
    "json": (),
    "each": (),
    "length": (),
    "split": (),
    "join": (),
    "linked": (),
}
# how each step that takes a value is written (docs/mappings.md, "Pipe steps")
STEP_EXAMPLES = {
    "case": "{case: lower}",
    "replace": '{replace: "-", with: "_"}',
    "lookup": "{lookup: NAME} or {lookup: {key: value}}",
    "to": "{to: integer}",
    "not_after": "{not_after: now}",
    "pick": "{pick: [id, name]}",
    "omit": "{omit: [password]}",
    "rename": "{rename: {old_name: new_name}}",
    "json": "{json: encode} or {json: decode}",
    "each": "{each: {object: {sku: $item.id}}}",
    "split": '{split: ","}',
    "join": '{join: ", "}',
}
BARE_STEPS = ("trim", "compact", "length", "flatten", "tz_offset", "linked")
ON_ERROR = ("drop_field", "drop_event", "fail")
# bare steps whose only value is `true` (tz_offset's value is the instant; linked checks its own)
_SWITCH_STEPS = ("trim", "compact", "length", "flatten")


def compile_pipe(c: ExprCompiler, node: YNode, ypath: str) -> list[Step]:
    if not node.is_list:
        c.diags.add(node, ypath, "expected a list of steps, e.g. [trim, {case: lower}]")
        return []
    out = []
    for i, item in enumerate(node.value):
        step = compile_step(c, item, join(ypath, i))
        if step is not None:
            out.append(step)
    return out


def compile_step(c: ExprCompiler, node: YNode, ypath: str) -> Step | None:
    if isinstance(node.value, str):
        name = node.value
        if name in STEP_PARAMS and name not in BARE_STEPS:
            # A step that takes a value, written bare: "unknown step 'lookup' (did you mean
            # 'lookup'?)" sent the author looking for a typo that is not there.
            c.diags.add(node, ypath, f"the '{name}' step needs a value; write it as {STEP_EXAMPLES[name]}")
            return None
        if name not in BARE_STEPS:
            c.diags.add(
                node,
                ypath,
                f"unknown step {name!r}{did_you_mean(name, STEP_PARAMS)}; steps without parameters are: "
                + ", ".join(BARE_STEPS),
            )
            return None
        node = YNode(
            {name: YNode(True, node.line, node.column)}, node.line, node.column, {name: (node.line, node.column)}
        )
    if not node.is_map:
        c.diags.add(node, ypath, "expected a step such as {case: lower} or {to: integer}")
        return None
    names = [k for k in node.value if k in STEP_PARAMS]
    if len(names) != 1:
        unknown = [k for k in node.value if not any(k in p for p in STEP_PARAMS.values())]
        hint = did_you_mean(unknown[0], STEP_PARAMS) if unknown else ""
        c.diags.add(
            node,
            ypath,
            (f"a step needs exactly one of: {', '.join(STEP_PARAMS)}{hint}")
            if not names
            else f"one step may use only one of {', '.join(names)}; list them as separate steps",
        )
        return None
    name = names[0]
    if not c.diags.check_keys(node, ypath, (name, *STEP_PARAMS[name]), f"the '{name}' step"):
        return None
    if name in _SWITCH_STEPS and node.value[name].value is not True:
        # {flatten: false} must not flatten: these steps take no value but `true`
        c.diags.add(node.value[name], join(ypath, name), f"write it as the bare step `{name}` (or {{{name}: true}})")
        return None
    return _BUILDERS[name](c, node.value, join(ypath, name))


def _policy(c: ExprCompiler, p: dict[str, YNode], ypath: str, what: str) -> Callable[[Any, str], Any]:
    policy = "drop_field"
    reason = "coercion_failed"
    base = ypath.rsplit(".", 1)[0]
    if "on_error" in p:
        n = p["on_error"]
        if n.value not in ON_ERROR:
            c.diags.add(
                n,
                join(base, "on_error"),
                f"expected one of {', '.join(ON_ERROR)}, got {n.value!r}{did_you_mean(str(n.value), ON_ERROR)}",
            )
        else:
            policy = n.value
    if "reason" in p:
        if not isinstance(p["reason"].value, str) or not p["reason"].value:
            c.diags.add(p["reason"], join(base, "reason"), "expected a reason string")
        else:
            reason = p["reason"].value

    def on_error(value: Any, message: str) -> Any:
        detail = f"{base}: {message}"
        if policy == "drop_event":
            raise DropEvent(reason, detail)
        if policy == "fail":
            raise FailEvent(reason, detail)
        return MISSING

    _ = what
    return on_error


def _flag(c: ExprCompiler, p: dict[str, YNode], key: str, base: str) -> bool | None:
    """A boolean option (false when not given), or None after a diagnostic."""
    if key not in p:
        return False
    n = p[key]
    if not isinstance(n.value, bool):
        c.diags.add(n, join(base, key), f"expected true or false, got {short(n.plain())}")
        return None
    return n.value


def _b_case(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    mode = p["case"].plain()
    funcs = {"lower": str.lower, "upper": str.upper, "title": str.title}
    if not isinstance(mode, str) or mode not in funcs:
        c.diags.add(p["case"], ypath, f"expected lower, upper or title, got {mode!r}{did_you_mean(str(mode), funcs)}")
        return None
    f = funcs[mode]
    return lambda v, env: f(v) if type(v) is str else v


def _b_trim(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    return emits_step(lambda v, env: v.strip() if type(v) is str else v, _emit_trim)


def _emit_trim(g: Gen, v: str) -> str:
    return f"({v}.strip() if type({v}) is str else {v})"


def _b_replace(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    old = p["replace"].value
    base = ypath.rsplit(".", 1)[0]
    if not isinstance(old, str) or not old:
        c.diags.add(p["replace"], ypath, "expected the non-empty text to replace")
        return None
    if "with" not in p:
        c.diags.add(p["replace"], base, "the 'replace' step needs 'with' (use '' to delete)")
        return None
    new = p["with"].value
    if new is None:
        new = ""
    if not isinstance(new, str):
        c.diags.add(p["with"], join(base, "with"), f"expected a string, got {new!r}")
        return None
    fold = _flag(c, p, "ignore_case", base)
    if fold is None:
        return None
    if not fold:
        return lambda v, env: v.replace(old, new) if type(v) is str else v
    # the file's text is escaped: a literal, never a pattern; matched in the original string,
    # so text whose lowercase has another length ("İ") is not cut at the wrong place
    pattern = re.compile(re.escape(old), re.IGNORECASE)

    def replace_folded(v: Any, env: Env) -> Any:
        if type(v) is not str:
            return v
        return pattern.sub(lambda m: new, v)

    return replace_folded


def _b_lookup(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    lk = c.lookup(p["lookup"], ypath)
    if lk is None:
        return None
    base = ypath.rsplit(".", 1)[0]
    if lk.table is None:
        c.diags.add(p["lookup"], ypath, f"lookup {p['lookup'].value!r} is a set of values, not a table")
        return None
    step_fold = _flag(c, p, "ignore_case", base)
    keep = _flag(c, p, "keep_unmatched", base)
    if step_fold is None or keep is None:
        return None
    fold = lk.ignore_case or step_fold
    table = {(k.lower() if fold else k): v for k, v in lk.table.items()}
    default_fn = c.value(p["default"], join(base, "default")) if "default" in p else None
    table_default = lk.default

    scalar_values = all(type(x) not in (dict, list) for x in table.values())

    def lookup(v: Any, env: Env) -> Any:
        if type(v) is str:
            key: str | None = v
        else:
            try:
                key = to_string(v)
            except CoercionError:
                key = None
        if key is not None:
            if fold:
                key = key.lower()
            found = table.get(key, MISSING)
            if found is not MISSING:
                return found if scalar_values else clone(found)
        if keep:
            return v
        if default_fn is not None:
            return default_fn(env)
        return clone(table_default)

    if not scalar_values:
        return lookup

    def emit_lookup(g: Gen, v: str) -> str:
        # a string found in the table, inline; everything else through the closure
        hit = g.fresh()
        key = f"{v}.lower()" if fold else v
        found = f"({hit} := {g.bind(table)}.get({key}, M)) is not M"
        return f"({hit} if type({v}) is str and {found} else {g.bind(lookup)}({v}, env))"

    return emits_step(lookup, emit_lookup)


def _b_to(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    target = p["to"].plain()
    if not isinstance(target, str) or target not in COERCIONS:
        c.diags.add(
            p["to"],
            ypath,
            f"unknown type {target!r}{did_you_mean(str(target), COERCIONS)}; expected one of: {', '.join(COERCIONS)}",
        )
        return None
    conv = COERCIONS[target]
    on_error = _policy(c, p, ypath, target)
    if target == "string":

        def coerce_str(v: Any, env: Env) -> Any:
            if type(v) is str:
                return v
            try:
                return conv(v)
            except CoercionError as exc:
                return on_error(v, f"cannot convert to {target}: {exc}")

        # Fused code inlines only the common case, a string already.
        return emits_step(coerce_str, lambda g, v: f"({v} if type({v}) is str else {g.bind(coerce_str)}({v}, env))")

    def coerce(v: Any, env: Env) -> Any:
        try:
            return conv(v)
        except CoercionError as exc:
            return on_error(v, f"cannot convert to {target}: {exc}")

    def emit_coerce(g: Gen, v: str) -> str:
        # The conversion called in place; one that fails is converted again by the step,
        # which fails the same way (conversions are pure) and hands it to its policy.
        out = g.fresh()
        with g.block("try:"):
            g.line(f"{out} = {g.bind(conv)}({v})")
        with g.block(f"except {g.bind(CoercionError)}:"):
            g.line(f"{out} = {g.bind(coerce)}({v}, env)")
        return out

    return emits_step(coerce, emit_coerce)


def _b_tz_offset(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    # the step's value is the instant the offset is taken at (DST); true means "now"
    node = p["tz_offset"]
    if not _time_or_expression(node):
        # At run time a value that is no time falls back to now: `{tz_offset: false}` or
        # `{tz_offset: yesterday}` would silently mean "now", as `{flatten: false}` must not.
        c.diags.add(
            node,
            ypath,
            "expected the instant to take the offset at, such as $let.current_time or a time, or"
            f" the bare step `tz_offset` for now; got {kind_of(node)}",
        )
        return None
    at = None if node.value is True else c.value(node, ypath)
    on_error = _policy(c, p, ypath, "tz_offset")

    def tz_offset(v: Any, env: Env) -> Any:
        if type(v) is not str:
            return on_error(v, f"expected an IANA time zone name, got {short(v)}")
        return offset_at(v, at(env) if at is not None else MISSING)

    def offset_at(v: str, when: Any) -> Any:
        # an int that large is epoch milliseconds (runtime.MILLIS_THRESHOLD), read as to_datetime reads it
        if type(when) is not int or not -100_000_000_000 < when < 100_000_000_000:
            try:
                when = (
                    math.floor(to_datetime(when).timestamp())
                    if when is not MISSING and when is not None
                    else int(time.time())
                )
            except CoercionError:
                when = int(time.time())
        off = zone_offset(v, when)
        if off is None:
            return on_error(v, f"unknown time zone {short(v)}")
        return off

    if at is None:
        return tz_offset

    def emit_tz_offset(g: Gen, v: str) -> str:
        # Inline, the usual case: a zone's name, an instant in epoch seconds, and an hour
        # whose offset zone_offset has memoised (_HOUR_OFFSETS); the rest goes to
        # offset_at with the instant read here, as tz_offset would have read it.
        out = g.fresh()
        with g.block(f"if type({v}) is str:"):
            when = g.value(at)
            hit = g.fresh()
            g.line(
                f"{out} = {hit} if type({when}) is int and -100_000_000_000 < {when} < 100_000_000_000"
                f" and type({hit} := {g.bind(_HOUR_OFFSETS)}.get(({v}, {when} // 3600))) is int"
                f" else {g.bind(offset_at)}({v}, {when})"
            )
        with g.block("else:"):
            g.line(f"{out} = {g.bind(tz_offset)}({v}, env)")
        return out

    return emits_step(tz_offset, emit_tz_offset)


def _time_or_expression(node: YNode) -> bool:
    """Whether a step's value may be an instant: true (now), a path, template, list or
    directive (read per event), or a literal that reads as a time."""
    v = node.value
    if v is True or isinstance(v, dict | list) or (isinstance(v, str) and (v.startswith("$") or "{{" in v)):
        return True
    try:
        to_datetime(v)
    except CoercionError:
        return False
    return True


def _b_not_after(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    # Only "now" for now: a later bound (another time of the event) would need its units
    # reconciled with the value's, and no mapping has asked for one.
    bound = p["not_after"].plain()
    if bound != "now":
        c.diags.add(p["not_after"], ypath, f"expected now (the moment of mapping), got {short(bound)}")
        return None

    def not_after(v: Any, env: Env) -> Any:
        # An epoch time later than now becomes now, in the value's unit and type; a number
        # that large is epoch milliseconds, as every time step reads it (runtime.to_datetime).
        t = type(v)
        if t is not int and t is not float:
            return v  # bool, strings (ISO 8601 too: convert first) and the rest pass unchanged
        now = time.time()
        if abs(v) >= MILLIS_THRESHOLD:
            now *= 1000
        if not v > now:  # NaN too: no time, left as it is
            return v
        return math.floor(now) if t is int else now

    # Fused code inlines the usual case, whole epoch seconds not ahead of the clock; the
    # rest (milliseconds, floats, a future time, anything else) calls the step.
    clock = time.time
    return emits_step(
        not_after,
        lambda g, v: f"({v} if type({v}) is int and {v} <= {g.bind(clock)}() else {g.bind(not_after)}({v}, env))",
    )


_ZONES: dict[str, ZoneInfo | None] = {}
_HOUR_OFFSETS: dict[tuple[str, int], int | None] = {}


def zone_offset(name: str, epoch: int) -> int | None:
    """UTC offset in seconds of an IANA zone at an instant; None for an unknown zone.

    Offsets are memoised per zone and hour, but only for hours whose start and end
    have the same offset: an hour containing a transition is always computed exactly.
    """
    hour = epoch // 3600
    key = (name, hour)
    cached = _HOUR_OFFSETS.get(key, MISSING)
    if type(cached) is int:
        return cached
    if name in _ZONES:
        zone = _ZONES[name]
    else:
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            zone = None
        if len(_ZONES) >= 4096:
            _ZONES.clear()
        _ZONES[name] = zone
    if zone is None:
        return None
    exact = _offset(zone, epoch)
    if cached is MISSING:
        start, end = _offset(zone, hour * 3600), _offset(zone, hour * 3600 + 3599)
        if len(_HOUR_OFFSETS) >= 65536:
            _HOUR_OFFSETS.clear()
        _HOUR_OFFSETS[key] = start if start == end == exact else None
    return exact


def _offset(zone: ZoneInfo, epoch: int) -> int:
    try:
        off = datetime.fromtimestamp(epoch, UTC).astimezone(zone).utcoffset()
    except (OverflowError, OSError, ValueError):
        return 0
    return int(off.total_seconds()) if off is not None else 0


def _b_flatten(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    base = ypath.rsplit(".", 1)[0]
    sep = "."
    if "separator" in p:
        sep = p["separator"].value
        if not isinstance(sep, str) or not sep:
            c.diags.add(p["separator"], join(base, "separator"), "expected a non-empty separator string")
            return None
    arrays = True
    if "arrays" in p:
        if not isinstance(p["arrays"].value, bool):
            c.diags.add(p["arrays"], join(base, "arrays"), "expected true (flatten arrays) or false")
            return None
        arrays = p["arrays"].value

    def flatten(v: Any, env: Env) -> Any:
        if type(v) is not dict and not (arrays and type(v) is list):
            return v
        out: dict[str, Any] = {}
        _flatten_into(out, "", v, sep, arrays)
        return out

    return flatten


def _flatten_into(out: dict[str, Any], prefix: str, v: Any, sep: str, arrays: bool) -> None:
    if type(v) is dict and v:
        for k, x in v.items():
            _flatten_into(out, f"{prefix}{sep}{k}" if prefix else str(k), x, sep, arrays)
    elif arrays and type(v) is list and v:
        for i, x in enumerate(v):
            _flatten_into(out, f"{prefix}{sep}{i}" if prefix else str(i), x, sep, arrays)
    else:
        out[prefix] = v


def _names(c: ExprCompiler, n: YNode, ypath: str) -> list[str] | None:
    if not n.is_list or not all(isinstance(x.value, str) for x in n.value):
        c.diags.add(n, ypath, "expected a list of key names")
        return None
    return [x.value for x in n.value]


def _b_pick(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    keys = _names(c, p["pick"], ypath)
    if keys is None:
        return None
    return lambda v, env: {k: v[k] for k in keys if k in v} if type(v) is dict else v


def _b_omit(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    names = _names(c, p["omit"], ypath)
    if names is None:
        return None
    keys = frozenset(names)
    return lambda v, env: {k: x for k, x in v.items() if k not in keys} if type(v) is dict else v


def _b_rename(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    n = p["rename"]
    if not n.is_map or not all(isinstance(x.value, str) for x in n.value.values()):
        c.diags.add(n, ypath, "expected a mapping of old key to new key")
        return None
    table = {k: x.value for k, x in n.value.items()}

    def rename(v: Any, env: Env) -> Any:
        if type(v) is not dict:
            return v
        return {table.get(k, k): x for k, x in v.items()}

    return rename


def _b_compact(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    return lambda v, env: _compact(v)


def _compact(v: Any) -> Any:
    if type(v) is dict:
        out = {}
        for k, x in v.items():
            x = _compact(x)
            if not is_empty(x):
                out[k] = x
        return out
    if type(v) is list:
        return [y for y in (_compact(x) for x in v) if not is_empty(y)]
    return v


def _b_json(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    mode = p["json"].value
    if mode == "encode":

        def encode(v: Any, env: Env) -> Any:
            try:
                return orjson.dumps(v).decode()
            except TypeError:  # nesting deeper than 255, integers beyond 64 bits: left out
                return MISSING

        return encode
    if mode == "decode":

        def decode(v: Any, env: Env) -> Any:
            if type(v) is not str:
                return v
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return v

        return decode
    c.diags.add(p["json"], ypath, f"expected encode or decode, got {p['json'].plain()!r}")
    return None


def _b_each(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    c.in_each += 1
    try:
        body = c.value(p["each"], ypath)
    finally:
        c.in_each -= 1

    def each(v: Any, env: Env) -> Any:
        if type(v) is not list:
            v = [v]
        saved = env.item
        out = []
        try:
            for item in v:
                env.item = item
                x = body(env)
                if x is not MISSING:
                    out.append(x)
        finally:
            env.item = saved
        return out

    return each


def _b_length(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    return emits_step(lambda v, env: len(v) if type(v) in (str, list, dict) else MISSING, _emit_length)


def _emit_length(g: Gen, v: str) -> str:
    return f"(len({v}) if type({v}) in EMPTY_TYPES else M)"


def _b_split(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    sep = p["split"].value
    if not isinstance(sep, str) or not sep:
        c.diags.add(p["split"], ypath, "expected a non-empty separator string")
        return None
    return lambda v, env: v.split(sep) if type(v) is str else v


def _b_join(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    sep = p["join"].value
    if not isinstance(sep, str):
        c.diags.add(p["join"], ypath, "expected a separator string")
        return None

    def join_items(v: Any, env: Env) -> Any:
        if type(v) is not list:
            return v
        parts = []
        for x in v:
            try:
                parts.append(to_string(x))
            except CoercionError:
                continue
        return sep.join(parts)

    return join_items


def _b_linked(c: ExprCompiler, p: dict[str, YNode], ypath: str) -> Step | None:
    if p["linked"].value is not True:
        c.diags.add(p["linked"], ypath, "write it as the bare step `linked` (or {linked: true})")
        return None

    def linked(v: Any, env: Env) -> Any:
        # The id's identity link when the store has one (resolved before mapping, for the
        # ids of identity.key and identity.also), else the id itself.
        return env.links.get(v, v) if type(v) is str else v

    return linked


_BUILDERS: dict[str, Callable[..., Step | None]] = {
    "case": _b_case,
    "trim": _b_trim,
    "replace": _b_replace,
    "lookup": _b_lookup,
    "to": _b_to,
    "tz_offset": _b_tz_offset,
    "not_after": _b_not_after,
    "flatten": _b_flatten,
    "pick": _b_pick,
    "omit": _b_omit,
    "rename": _b_rename,
    "compact": _b_compact,
    "json": _b_json,
    "each": _b_each,
    "length": _b_length,
    "split": _b_split,
    "join": _b_join,
    "linked": _b_linked,
}
