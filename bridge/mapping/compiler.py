"""Compile one mapping file (already parsed to YNodes) into a ``CompiledMapping``."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bridge.mapping.api import CompiledMapping, Discarded, Failed, LinkFilter, MapContext, MapResult, Output
from bridge.mapping.conditions import Guard, conjunction, fuse_condition, guard_of, is_exact, passes
from bridge.mapping.expressions import Cond, ExprCompiler, Fn, Lookup, Scope, build_object, literal_const
from bridge.mapping.fuse import Gen, emits, fuse
from bridge.mapping.options import OptionSpec, compile_options, option_problems
from bridge.mapping.paths import PathError, Segment, parse_path
from bridge.mapping.runtime import MISSING, DropEvent, Env, FailEvent, clone, event_env
from bridge.mapping.shapes import SHAPES, Shape, body_checker, check_body_node
from bridge.mapping.yamlnodes import Diagnostics, YNode, did_you_mean, join, kind_of
from bridge.sources.segment.spec import CALL_TYPES, WEBHOOK_ONLY_TYPES

TOP_KEYS = (
    "source_format",
    "destination_kind",
    "description",
    "options",
    "integrations",
    "lookups",
    "identity",
    "let",
    "drop",
    "rules",
)
SOURCE_FORMATS = ("segment", "moengage_streams")
# Every `type` a Segment source stores (it refuses any other at ingest).
SEGMENT_TYPES = CALL_TYPES | WEBHOOK_ONLY_TYPES
RULE_KEYS = ("name", "description", "match", "when", "kind", "body", "drop", "detail", "overrides", "continue")


@dataclass(slots=True)
class _Override:
    drop: str | None
    sets: list[tuple[tuple[Segment, ...], Fn]]


@dataclass(slots=True)
class _Rule:
    name: str
    when: Cond
    kind: str
    body: Fn | None
    drop: str | None
    detail: Fn | None
    override_by: Fn | None
    overrides: dict[str, _Override]
    keep_going: bool = False
    check: Callable[[dict[str, Any]], str | None] = lambda body: None
    # For a rule that goes on (continue: true): the rules below it, with their guards, that
    # an event it matched may also match (see YamlMapping.__init__).
    after: list[tuple[_Rule, Guard | None]] | None = None


# identity_ids' options when its caller gives none: the declared defaults alone. Never
# written to (an Env's options are read only).
_NO_OPTIONS: dict[str, Any] = {}


class YamlMapping(CompiledMapping):
    """A mapping compiled from YAML; immutable after construction."""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        path: str,
        source_format: str,
        destination_kind: str,
        integrations: tuple[str, ...],
        identity_key: Fn | None,
        identity_link: tuple[Cond, Fn, Fn] | None,
        identity_also: list[Fn],
        drops: list[tuple[Cond, str, Fn | None]],
        rules: list[_Rule],
        files: tuple[str, ...],
        option_names: frozenset[str] | None = None,
        option_specs: dict[str, OptionSpec] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.source_format = source_format
        self.destination_kind = destination_kind
        self.files = files
        self._option_names = option_names
        self._option_specs = option_specs or {}
        # The declared defaults: what $options.NAME reads when the destination does not set
        # NAME. The options given with them, for the last options seen (a destination's
        # worker gives the same object every time), so an event does not build a dict.
        self._defaults = {n: s.default for n, s in self._option_specs.items() if s.has_default}
        self._with_defaults: tuple[Mapping[str, Any], Mapping[str, Any]] = (self._defaults, self._defaults)
        self._integrations = integrations
        self._identity_key = fuse(identity_key) if identity_key is not None else None
        self._identity_link = identity_link
        self._identity_also = [fuse(fn) for fn in identity_also]
        # identity_ids, as one generated function (see _identity_ids).
        self._ids = _identity_ids(identity_key, identity_also, self._identity_key, self._identity_also)
        self._drops = drops
        # One generated function asks every drop's condition in turn (see _first_drop).
        self._first_drop = _first_drop([cond for cond, _, _ in drops]) if drops else None
        # Checked before any condition runs (see conditions.Guard).
        self._link_guard = guard_of(identity_link[0]) if identity_link is not None else None
        self._rule_guards: list[tuple[_Rule, Guard | None]] = [(r, guard_of(r.when)) for r in rules]
        # Once a `continue: true` rule emits, only the rules below it whose guard its events
        # can pass are tried: an identify's customer rule goes on to the identify rules below
        # it, not through every other type's rules.
        _link_continuations(self._rule_guards)
        self._dispatch_field, self._dispatch, self._dispatch_default = _dispatch(self._rule_guards)

    def integration_names(self) -> tuple[str, ...]:
        return self._integrations

    def option_names(self) -> frozenset[str] | None:
        return self._option_names

    def option_problems(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        return option_problems(self._option_specs, options)

    def _options(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        """``given`` with the declared defaults under it."""
        if not self._defaults:
            return given
        last, merged = self._with_defaults
        if given is not last:
            merged = {**self._defaults, **given}
            self._with_defaults = (given, merged)
        return merged

    def link_filter(self) -> LinkFilter:
        if self._identity_link is None:
            return False
        return self._link_guard if self._link_guard is not None else True

    def identity_key(self, event: dict[str, Any]) -> str | None:
        if self._identity_key is None or type(event) is not dict:
            return None
        return self._key_in(Env(event, None, {}, ""))

    def _key_in(self, env: Env) -> str | None:
        assert self._identity_key is not None
        try:
            return _as_id(self._identity_key(env))
        except Exception:  # called at ingest and delivery: odd data means no key, never a crash
            return None

    def identity_ids(self, event: dict[str, Any], options: Mapping[str, Any] | None = None) -> list[str]:
        if type(event) is not dict:
            return []
        # One call for the key and the others, with the options apply reads (their defaults).
        return self._ids(event_env(event, None, self._options(_NO_OPTIONS if options is None else options), "", None))

    def identity_link(self, event: dict[str, Any]) -> tuple[str, str] | None:
        if self._identity_link is None or type(event) is not dict:
            return None
        guard = self._link_guard
        if guard is not None and not passes(guard, event):
            return None
        if self._integrations and self._integrations_block(event) is not None:
            # Kept away from this destination: the event must not change how it names the user.
            return None
        when, src, dst = self._identity_link
        env = Env(event, None, {}, "")
        try:
            if not when(env):
                return None
            a, b = _as_id(src(env)), _as_id(dst(env))
        except Exception:  # called at ingest: odd data means no link, never a crash
            return None
        if a is None or b is None or a == b:
            return None
        return (a, b)

    def apply(self, event: dict[str, Any], ctx: MapContext) -> MapResult:
        if type(event) is not dict:
            return Failed("invalid_event", f"expected a JSON object, got {type(event).__name__}")
        # `in`, not a read and a type test: most events have no integrations, and
        # _integrations_block tests the type itself.
        if self._integrations and "integrations" in event:
            blocked = self._integrations_block(event)
            if blocked is not None:
                return blocked
        link = ctx.linked_id
        if link is None and ctx.links:
            # $link is the identity key's link, from the links resolved for this event.
            key = self.identity_key(event)
            link = ctx.links.get(key) if key is not None else None
        env = event_env(event, link, self._options(ctx.options), ctx.source, ctx.links)
        try:
            if self._first_drop is not None:
                dropped = self._first_drop(env)
                if dropped >= 0:
                    _, reason, detail = self._drops[dropped]
                    return Discarded(reason, _detail(detail, env))
            outputs: list[Output] = []
            # The rules this event's value of the dispatch field (`type`) lets it match
            # (see _dispatch), each with the condition still to ask, or None.
            value = event.get(self._dispatch_field)
            rules = self._dispatch.get(value, self._dispatch_default) if type(value) is str else self._dispatch_default
            for rule, when in rules:
                if when is not None and not when(env):
                    continue
                if rule.drop is not None:
                    return Discarded(rule.drop, _detail(rule.detail, env))
                if rule.override_by is None and rule.body is not None:
                    # _emit without overrides, here: a call fewer for nearly every event
                    body = rule.body(env)
                    problem = rule.check(body)
                    if problem is not None:
                        return _invalid(rule, problem)
                    outputs.append(_output(rule.kind, body))
                else:
                    result = self._emit(rule, env)
                    if not isinstance(result, Output):
                        return result
                    outputs.append(result)
                if not rule.keep_going:
                    break
                stop = self._go_on(rule, event, env, outputs)
                if stop is not None:
                    return stop
                break
        except DropEvent as exc:
            return Discarded(exc.reason, exc.detail)
        except FailEvent as exc:
            return Failed(exc.reason, exc.detail)
        except Exception as exc:  # a mapping must never crash delivery on odd data
            return Failed("mapping_error", f"{type(exc).__name__}: {exc}")
        if not outputs:
            return Discarded("no_matching_rule", f"no rule of {self.name} applies to this event")
        if len(outputs) > 1 and self.destination_kind == "segment":
            shared = _shared_message_id(outputs)
            if shared is not None:
                return Failed("invalid_output", shared)
        return outputs

    def _go_on(self, rule: _Rule, event: dict[str, Any], env: Env, outputs: list[Output]) -> Discarded | Failed | None:
        """After ``rule`` (continue: true) emitted: the rules its ``after`` names, each tried
        as ``apply`` tries every rule. The event's end, when a drop rule or a failed output
        ends it, else None."""
        candidates = rule.after
        while candidates:
            for nxt, guard in candidates:
                if guard is not None:
                    value = event.get(guard[0])
                    if type(value) is not str or value not in guard[1]:
                        continue
                if not nxt.when(env):
                    continue
                if nxt.drop is not None:
                    return Discarded(nxt.drop, _detail(nxt.detail, env))
                result = self._emit(nxt, env)
                if not isinstance(result, Output):
                    return result
                outputs.append(result)
                candidates = nxt.after if nxt.keep_going else None
                break
            else:
                return None
        return None

    def _emit(self, rule: _Rule, env: Env) -> Output | Discarded | Failed:
        assert rule.body is not None
        body = rule.body(env)
        if rule.override_by is not None:
            key = rule.override_by(env)
            ov = rule.overrides.get(key) if type(key) is str else None
            if ov is not None:
                if ov.drop is not None:
                    return Discarded(ov.drop, f"override for {key!r} in rule {rule.name!r}")
                for segs, fn in ov.sets:
                    _set_path(body, segs, fn(env))
        problem = rule.check(body)
        if problem is not None:
            return _invalid(rule, problem)
        return _output(rule.kind, body)

    def _integrations_block(self, event: dict[str, Any]) -> Discarded | None:
        integ = event.get("integrations")
        if type(integ) is not dict:
            return None
        for name in self._integrations:
            if name in integ:
                if integ[name] is False:
                    return Discarded("integrations_disabled", f"integrations[{name!r}] is false")
                return None
        if integ.get("All") is False:
            return Discarded("integrations_disabled", "integrations.All is false")
        return None


_new = object.__new__
_set = object.__setattr__


def _output(kind: str, body: dict[str, Any]) -> Output:
    """``Output(kind, body)``, as its frozen dataclass __init__ sets it, without calling the
    class: one an event, and the class call (a C-level call into __init__, its frame,
    its two global lookups) cost more than mapping a page's attributes."""
    out: Output = _new(Output)
    _set(out, "kind", kind)
    _set(out, "body", body)
    return out


def _invalid(rule: _Rule, problem: str) -> Failed:
    return Failed("invalid_output", f"rule {rule.name!r} ({rule.kind}): {problem}")


def _identity_ids(
    key: Fn | None, also: list[Fn], fused_key: Fn | None, fused_also: list[Fn]
) -> Callable[[Env], list[str]]:
    """``identity_ids`` on an Env: the key's id, then each of ``also`` not already there,
    each read as ``_as_id`` reads it, and one that fails is no id (never a crash). Run per
    delivered event, so generated as one function from ``key`` and ``also`` (their trees):
    calling each one's fused function, then ``_as_id``, cost four calls an event. If it
    cannot be generated, the fused functions run in turn, as ``ids`` below."""
    fns = [key] if key is not None else []
    fns += also
    fused = [fused_key] if fused_key is not None else []
    fused += fused_also

    def ids(env: Env) -> list[str]:
        out: list[str] = []
        for fn in fused:
            try:
                found = _as_id(fn(env))
            except Exception:  # odd data means no id, never a crash
                continue
            if found is not None and found not in out:
                out.append(found)
        return out

    def emit(g: Gen) -> str:
        out = g.fresh()
        g.line(f"{out} = []")
        for fn in fns:
            with g.block("try:"):
                found = g.assign(fn)
                # _as_id, inline: an int as its digits, a non-empty string as it is.
                with g.block(f"if type({found}) is int:"):
                    g.line(f"{found} = str({found})")
                with g.block(f"if type({found}) is str and {found} and {found} not in {out}:"):
                    g.line(f"{out}.append({found})")
            with g.block("except Exception:"):  # odd data means no id, never a crash
                g.line("pass")
        return out

    return fuse(emits(ids, emit))


# The top-level drops the generated function asks nested, each in the `else` of the one
# before (_first_drop); the rest are asked flat.
NESTED_DROPS = 4


def _first_drop(conds: list[Cond]) -> Callable[[Env], int]:
    """The index of the first of ``conds`` (the top-level drops) that holds, else -1, as
    one generated function. Asked of every event, each drop's own function cost a call,
    a prologue (the event, its lets, a type check) and a path read its neighbours had
    just made (``$.traits``, ``$let.customer_id``); one function pays those once."""
    fused = [fuse(cond) for cond in conds]  # what runs if the whole cannot be generated

    def first(env: Env) -> int:
        for i, cond in enumerate(fused):
            if cond(env):
                return i
        return -1

    def emit(g: Gen) -> str:
        out = g.fresh()
        g.line(f"{out} = -1")
        base = g.depth
        for i, cond in enumerate(conds):
            if i and g.depth - base < NESTED_DROPS:
                # In the `else` of the drop before: no test of the answer, and a value that
                # drop read (`$let.customer_id`) is known here (Gen.let_read).
                g.line("else:")
                g.depth += 1
            elif i:
                # Past a few, flat: each later drop is asked under one `if`, however many
                # there are, so the nesting stays within Python's limit and MAX_DEPTH.
                g.depth = base
                g.line(f"if {out} < 0:")
                g.depth += 1
            g.line(f"if {g.cond(cond)}: {out} = {i}")
        g.depth = base
        return out

    return fuse(emits(first, emit))


# A rule to try, with the condition to ask of the event first (None: none is needed).
_Candidate = tuple[_Rule, Cond | None]


def _dispatch(
    rule_guards: list[tuple[_Rule, Guard | None]],
) -> tuple[str, dict[str, list[_Candidate]], list[_Candidate]]:
    """The rules an event may match, listed once per value of the field most guards ask
    (``type`` in a Segment mapping), in order: (that field, {value: its candidates}, the
    candidates of any other value). Every rule asked each event's guard in turn; now
    ``apply`` reads the field once, and a rule whose condition is its guard (a lone
    ``match: {type: track}``) is not asked at all. A rule guarded by another field, or by
    none, is in every list, with its whole condition (which implies its guard)."""
    fields = Counter(g[0] for _, g in rule_guards if g is not None)
    # No guard at all: "" keys no list, so every event gets the default, every rule in it.
    field = fields.most_common(1)[0][0] if fields else ""

    # One pass over the rules, each added to the lists it belongs in: asking every rule once
    # per value took a file of a few thousand rules minutes to compile.
    by_value: dict[str, list[_Candidate]] = {}
    default: list[_Candidate] = []
    for rule, guard in rule_guards:
        if guard is None or guard[0] != field:
            for listed in (default, *by_value.values()):
                listed.append((rule, rule.when))
            continue
        candidate = (rule, None if is_exact(rule.when) else rule.when)
        for v in sorted(guard[1]):
            if v not in by_value:
                # A value first seen here is also matched by every earlier unguarded rule.
                by_value[v] = list(default)
            by_value[v].append(candidate)
    return field, by_value, default


def _link_continuations(rule_guards: list[tuple[_Rule, Guard | None]]) -> None:
    """Set each `continue: true` rule's ``after``: the rules below it that an event it
    matched may match too, in order. Those are the rules guarded by no field or by another
    field, and those whose values share one with its own (an event has one value of a
    field). Found through an index of the rules by field and value: compared with every
    rule below, a file of a few thousand such rules took minutes to load."""
    unguarded: list[int] = []
    by_field: dict[str, list[int]] = {}
    by_value: dict[tuple[str, str], list[int]] = {}
    for j, (_, guard) in enumerate(rule_guards):
        if guard is None:
            unguarded.append(j)
            continue
        by_field.setdefault(guard[0], []).append(j)
        for value in guard[1]:
            by_value.setdefault((guard[0], value), []).append(j)

    def below(positions: list[int], i: int) -> list[int]:
        return positions[bisect.bisect_right(positions, i) :]

    for i, (rule, guard) in enumerate(rule_guards):
        if not rule.keep_going:
            continue
        if guard is None:
            rule.after = rule_guards[i + 1 :]
            continue
        field, values = guard
        picked = set(below(unguarded, i))
        for other, positions in by_field.items():
            if other != field:
                picked.update(below(positions, i))
        for value in values:
            picked.update(below(by_value.get((field, value), []), i))
        rule.after = [rule_guards[j] for j in sorted(picked)]


def _shared_message_id(outputs: list[Output]) -> str | None:
    """What is wrong when two of one event's Segment outputs carry the same messageId:
    Segment keeps one event per messageId and answers 200 to the other, which is then lost
    without a trace. None when every messageId set is distinct."""
    seen: dict[str, str] = {}
    for output in outputs:
        message_id = output.body.get("messageId")
        if type(message_id) is not str:
            continue  # none: Segment assigns each its own
        if message_id in seen:
            return (
                f"the {seen[message_id]} and the {output.kind} outputs share messageId {message_id[:100]!r}; "
                "Segment keeps only the first of them: give each its own (e.g. a template with a suffix)"
            )
        seen[message_id] = output.kind
    return None


def _detail(fn: Fn | None, env: Env) -> str:
    if fn is None:
        return ""
    v = fn(env)
    return v if isinstance(v, str) else ""


def _as_id(v: Any) -> str | None:
    if type(v) is int:
        return str(v)
    if type(v) is str and v:
        return v
    return None


def _set_path(body: dict[str, Any], segs: tuple[Segment, ...], value: Any) -> None:
    """Write ``value`` at ``segs`` in ``body``, copy-on-write.

    ``body`` itself is fresh, but the containers under it may be the event's own
    (``attributes: $.properties``) or a cached let's: every container on the way down
    is replaced by a shallow copy before it is written to, so neither the event nor
    a later rule ever sees the change.
    """
    target: Any = body
    for s in segs[:-1]:
        if isinstance(s, str):
            if type(target) is not dict:
                return
            child = target.get(s)
            target[s] = dict(child) if type(child) is dict else list(child) if type(child) is list else {}
            target = target[s]
        else:
            if type(target) is not list or not -len(target) <= s < len(target):
                return
            child = target[s]
            if type(child) is dict:
                target[s] = dict(child)
            elif type(child) is list:
                target[s] = list(child)
            target = target[s]
    last = segs[-1]
    if type(last) is str and type(target) is dict:
        if value is MISSING:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(last, int) and type(target) is list and -len(target) <= last < len(target) and value is not MISSING:
        target[last] = value


class FileCompiler:
    """Compiles one parsed mapping file; all problems end up in ``diags``."""

    def __init__(self, diags: Diagnostics, path: Path, load_lookup_file: Callable[[Path, YNode, str], YNode | None]):
        self.diags = diags
        self.path = path
        self.scope = Scope()
        self.expr = ExprCompiler(diags, self.scope)
        self.load_lookup_file = load_lookup_file
        self.lookup_files: list[str] = []

    def compile(self, root: YNode, name: str, version: str) -> YamlMapping | None:
        d = self.diags
        if not root.is_map:
            d.add(root, "", "expected a mapping at the top level (source_format, destination_kind, rules, ...)")
            return None
        d.check_keys(root, "", TOP_KEYS, "a mapping file", required=("source_format", "destination_kind", "rules"))
        top = root.value
        specs = compile_options(top["options"], d) if "options" in top else None
        source_format = self._enum(top.get("source_format"), "source_format", SOURCE_FORMATS)
        destination = self._enum(top.get("destination_kind"), "destination_kind", tuple(SHAPES))
        integrations = self._integrations(top.get("integrations"), source_format)
        if "lookups" in top:
            self._lookups(top["lookups"])
        if "let" in top:
            self._lets(top["let"])
        identity_key, identity_link, identity_also = (
            self._identity(top["identity"]) if "identity" in top else (None, None, [])
        )
        drops = self._drops(top["drop"], "drop") if "drop" in top else []
        rules = self._rules(top["rules"], destination, source_format) if "rules" in top else []
        if specs is not None:
            self._check_declared(top["options"], specs)
        if d.items or source_format is None or destination is None:
            return None
        return YamlMapping(
            name=name,
            version=version,
            path=str(self.path),
            source_format=source_format,
            destination_kind=destination,
            integrations=integrations,
            identity_key=identity_key,
            identity_link=identity_link,
            identity_also=identity_also,
            drops=drops,
            rules=rules,
            files=tuple(self.lookup_files),
            option_names=self._option_names(specs),
            option_specs={n: s for n, s in (specs or {}).items() if s is not None},
        )

    def _option_names(self, specs: dict[str, OptionSpec | None] | None) -> frozenset[str] | None:
        """The option names a destination may set: the declared ones, else those read."""
        if specs is not None:
            return frozenset(specs)
        return None if self.expr.options_read is None else frozenset(self.expr.options_read)

    def _check_declared(self, node: YNode, specs: dict[str, OptionSpec | None]) -> None:
        """A mapping that declares its options reads only those, and reads each of them:
        an undeclared one would go unchecked, and an unread one would be a setting that
        does nothing."""
        read = self.expr.options_read
        for name, (at, ypath) in self.expr.option_reads.items():
            if name not in specs:
                self.diags.add(
                    at,
                    ypath,
                    f"$options.{name} is not declared under 'options'{did_you_mean(name, specs)}; "
                    f"declare it (options: {{{name}: {{type: ...}}}}) so a destination's value is checked",
                )
        if read is None:  # $options read whole: any declared name may be used
            return
        for name in specs:
            if name not in read:
                self.diags.add_at(
                    node.key_pos.get(name, (node.line, node.column)),
                    join("options", name),
                    f"option {name!r} is declared but the mapping never reads $options.{name}",
                )

    def _enum(self, node: YNode | None, key: str, choices: tuple[str, ...]) -> str | None:
        if node is None:
            return None
        if node.value not in choices:
            self.diags.add(
                node,
                key,
                f"expected one of {', '.join(choices)}, got {kind_of(node)}"
                + (did_you_mean(node.value, choices) if isinstance(node.value, str) else ""),
            )
            return None
        return str(node.value)

    def _integrations(self, node: YNode | None, source_format: str | None) -> tuple[str, ...]:
        if node is None:
            return ()
        if not node.is_list or not all(isinstance(x.value, str) and x.value for x in node.value):
            self.diags.add(node, "integrations", "expected a list of destination names, e.g. [MoEngage]")
            return ()
        if source_format is not None and source_format != "segment":
            self.diags.add(node, "integrations", "'integrations' only applies to source_format segment")
        return tuple(x.value for x in node.value)

    def _lookups(self, node: YNode) -> None:
        if not node.is_map:
            self.diags.add(node, "lookups", "expected a mapping of lookup name to table")
            return
        for lname, ln in node.value.items():
            lp = join("lookups", lname)
            self.scope.broken_lookups.add(lname)  # until it loads: its problem is said here, not at each use
            if ln.is_map and "file" in ln.value:
                if not self.diags.check_keys(ln, lp, ("file", "description"), "a lookup from a file"):
                    continue
                fn = ln.value["file"]
                if not isinstance(fn.value, str) or "\x00" in fn.value:
                    self.diags.add(fn, join(lp, "file"), "expected a path relative to the mapping file")
                    continue
                fpath = (self.path.parent / fn.value).resolve()
                loaded = self.load_lookup_file(fpath, fn, join(lp, "file"))
                if loaded is None:
                    continue
                self.lookup_files.append(str(fpath))
                file_diags = Diagnostics(str(fpath))
                lookup = self._lookup_def(loaded, "", file_diags)
                self.diags.items.extend(file_diags.items)
            else:
                lookup = self._lookup_def(ln, lp, self.diags)
            if lookup is not None:
                self.scope.lookups[lname] = lookup
                self.scope.broken_lookups.discard(lname)

    def _lookup_def(self, ln: YNode, lp: str, diags: Diagnostics) -> Lookup | None:
        if not ln.is_map:
            diags.add(ln, lp, "expected a lookup: {table: {...}, default: ...} or {values: [...]}")
            return None
        if not diags.check_keys(ln, lp, ("table", "values", "default", "ignore_case", "description"), "a lookup"):
            return None
        v = ln.value
        fold = False
        if "ignore_case" in v:
            if not isinstance(v["ignore_case"].value, bool):
                diags.add(
                    v["ignore_case"],
                    join(lp, "ignore_case"),
                    f"expected true or false, got {kind_of(v['ignore_case'])}",
                )
            else:
                fold = v["ignore_case"].value
        if ("table" in v) == ("values" in v):
            diags.add(ln, lp, "a lookup needs exactly one of 'table' (key -> value) or 'values' (a set)")
            return None
        if "values" in v:
            vn = v["values"]
            if not vn.is_list:
                diags.add(vn, join(lp, "values"), "expected a list of values")
                return None
            if "default" in v:
                diags.add(v["default"], join(lp, "default"), "'default' only applies to a table")
            bad = [x for x in vn.value if x.is_map or x.is_list]
            if bad:
                diags.add(bad[0], join(lp, "values"), "expected a list of strings, numbers, booleans or null")
                return None
            # A tuple: a set would keep one of true and 1 (equal to Python), which the
            # conditions tell apart.
            return Lookup(None, tuple(_set_item(x.value, fold) for x in vn.value), ignore_case=fold)
        tn = v["table"]
        if not tn.is_map:
            diags.add(tn, join(lp, "table"), "expected a mapping of key to value")
            return None
        default = v["default"].plain() if "default" in v else MISSING
        return Lookup({k: x.plain() for k, x in tn.value.items()}, None, default, fold)

    def _lets(self, node: YNode) -> None:
        if not node.is_map:
            self.diags.add(node, "let", "expected a mapping of name to value")
            return
        self.scope.let_order = list(node.value)
        for lname, ln in node.value.items():
            # compiled in file order, so a let can use only the lets above it: no cycles
            self.scope.compiling_let = lname
            tree = self.expr.value(ln, join("let", lname))
            self.scope.let_trees[lname] = tree
            self.scope.lets[lname] = fuse(tree)
        self.scope.compiling_let = None

    def _identity(self, node: YNode) -> tuple[Fn | None, tuple[Cond, Fn, Fn] | None, list[Fn]]:
        if not node.is_map:
            self.diags.add(node, "identity", "expected {key: ..., also: [...], link: {when, from, to}}")
            return None, None, []
        self.diags.check_keys(node, "identity", ("key", "also", "link"), "'identity'")
        # Fused by YamlMapping, which also generates identity_ids from these trees.
        key = self.expr.value(node.value["key"], "identity.key") if "key" in node.value else None
        also: list[Fn] = []
        if "also" in node.value:
            an = node.value["also"]
            if an.is_list:
                also = [self.expr.value(item, join("identity.also", i)) for i, item in enumerate(an.value)]
            else:
                self.diags.add(an, "identity.also", "expected a list of ids to resolve too, e.g. [$.previousId]")
        link = None
        if "link" in node.value:
            ln = node.value["link"]
            if ln.is_map and self.diags.check_keys(
                ln, "identity.link", ("when", "from", "to"), "'identity.link'", required=("from", "to")
            ):
                when = (
                    fuse_condition(self.expr.condition(ln.value["when"], "identity.link.when"))
                    if "when" in ln.value
                    else _true
                )
                link = (
                    when,
                    fuse(self.expr.value(ln.value["from"], "identity.link.from")),
                    fuse(self.expr.value(ln.value["to"], "identity.link.to")),
                )
            elif not ln.is_map:
                self.diags.add(ln, "identity.link", "expected {when: ..., from: ..., to: ...}")
        return key, link, also

    def _drops(self, node: YNode, ypath: str) -> list[tuple[Cond, str, Fn | None]]:
        out: list[tuple[Cond, str, Fn | None]] = []
        if not node.is_list:
            self.diags.add(node, ypath, "expected a list of {when: <condition>, reason: <text>}")
            return out
        for i, item in enumerate(node.value):
            ip = join(ypath, i)
            if not item.is_map:
                self.diags.add(item, ip, "expected {when: <condition>, reason: <text>}")
                continue
            if not self.diags.check_keys(
                item, ip, ("when", "reason", "detail", "description"), "a drop", required=("when", "reason")
            ):
                continue
            reason = item.value["reason"].value
            if not isinstance(reason, str) or not reason:
                self.diags.add(item.value["reason"], join(ip, "reason"), "expected a reason string, e.g. loop")
                continue
            # Fused with the other drops' (YamlMapping._first_drop), not alone.
            cond = self.expr.condition(item.value["when"], join(ip, "when"))
            detail = self.expr.value(item.value["detail"], join(ip, "detail")) if "detail" in item.value else None
            out.append((cond, reason, detail))
        return out

    def _rules(self, node: YNode, destination: str | None, source_format: str | None) -> list[_Rule]:
        out: list[_Rule] = []
        if not node.is_list or not node.value:
            self.diags.add(node, "rules", "expected a non-empty list of rules")
            return out
        names: set[str] = set()
        # The rules above that decide every event they match, with what they match (_covers).
        deciders = _Deciders()
        for i, item in enumerate(node.value):
            rule = self._rule(item, join("rules", i), destination, names)
            if rule is None:
                continue
            out.append(rule)
            if source_format == "segment":
                self._check_segment_types(item, join("rules", i), rule)
            self._check_reachable(item, join("rules", i), rule, deciders)
            covers = _covers(item, rule)
            if covers is not False:
                deciders.add(i, rule, covers)
        return out

    def _check_segment_types(self, item: YNode, ip: str, rule: _Rule) -> None:
        """A rule for a Segment call type that ingest never stores (it refuses the event:
        `type: Track`, `type: identity`) never matches anything: said at load."""
        guard = guard_of(rule.when)
        if guard is None or guard[0] != "type":
            return
        impossible = guard[1] - SEGMENT_TYPES
        # With some of its types stored, the rule does match: only the others are dead, and
        # "can never match" would send the author to delete a rule that runs.
        what = "can never match" if impossible == guard[1] else "lists a type that never matches"
        for kind in sorted(impossible):
            match = item.value.get("match")
            at = match.value["type"] if match is not None and match.is_map and "type" in match.value else item
            self.diags.add(
                at,
                join(ip, "match.type") if at is not item else ip,
                f"rule {rule.name!r} {what}: a Segment source stores no event of type {kind!r}"
                f"{did_you_mean(kind, SEGMENT_TYPES)}; its types are {', '.join(sorted(SEGMENT_TYPES))}",
            )

    def _check_reachable(self, item: YNode, ip: str, rule: _Rule, deciders: _Deciders) -> None:
        """The first matching rule decides, so a rule every one of whose events an earlier
        rule already decides never runs: a rule for one event name added below the rule
        for its whole type, or any rule below a catch-all. Said at load, not found later
        in the discards."""
        found = deciders.first_covering(guard_of(rule.when))
        if found is not None:
            i, earlier, covers = found
            name = earlier.name
            what = "every event" if covers is None else "every event this one would"
            fixes = f"move this rule above {name!r} or narrow {name!r} with 'match' or 'when'"
            if earlier.drop is None:
                fixes += f", or give {name!r} 'continue: true'"
            self.diags.add(
                item.value["name"],
                join(ip, "name"),
                f"rule {rule.name!r} can never match: rule {name!r} (rules[{i}]) above it matches {what}, "
                f"and the first rule that matches decides; {fixes}",
            )

    def _rule(self, item: YNode, ip: str, destination: str | None, names: set[str]) -> _Rule | None:
        d = self.diags
        if not item.is_map:
            d.add(item, ip, "expected a rule mapping with name, match/when, and kind + body (or drop)")
            return None
        if not d.check_keys(item, ip, RULE_KEYS, "a rule", required=("name",)):
            return None
        v = item.value
        raw_name = v["name"].value
        if type(raw_name) not in (str, int) or raw_name == "":
            # it names the rule in every discard, dead letter and diagnostic: "None" or "{'a': 1}" would not do
            d.add(v["name"], join(ip, "name"), f"expected a rule name such as track, got {kind_of(v['name'])}")
            return None
        name = str(raw_name)
        if name in names:
            d.add(v["name"], join(ip, "name"), f"duplicate rule name {name!r}")
        names.add(name)
        conds: list[Cond] = []
        if "match" in v:
            conds.append(self.expr.condition(YNode({"match": v["match"]}, item.line, item.column), ip))
        if "when" in v:
            conds.append(self.expr.condition(v["when"], join(ip, "when")))
        when = fuse_condition(_all(conds))
        detail = self.expr.value(v["detail"], join(ip, "detail")) if "detail" in v else None
        if "drop" in v:
            for k in ("kind", "body", "overrides", "continue"):
                if k in v:
                    d.add_at(item.key_pos[k], join(ip, k), f"a drop rule cannot have '{k}'")
            reason = v["drop"].value
            if not isinstance(reason, str) or not reason:
                d.add(v["drop"], join(ip, "drop"), "expected a reason string")
                return None
            return _Rule(name, when, "", None, reason, detail, None, {})
        if "kind" not in v or "body" not in v:
            d.add(item, ip, "a rule needs 'kind' and 'body' (or 'drop: <reason>' to discard)")
            return None
        kind = v["kind"].plain()
        if destination is None:
            return None
        kinds = SHAPES[destination]
        if not isinstance(kind, str) or kind not in kinds:
            d.add(
                v["kind"],
                join(ip, "kind"),
                f"{destination} has no output kind {kind!r}{did_you_mean(str(kind), kinds)}; "
                f"expected one of: {', '.join(kinds)}",
            )
            return None
        override_by, overrides, override_keys = (
            self._overrides(v["overrides"], join(ip, "overrides"), SHAPES[destination][kind])
            if "overrides" in v
            else (None, {}, set())
        )
        check_body_node(d, destination, kind, v["body"], join(ip, "body"), override_keys)
        fields = self.expr.fields(v["body"], join(ip, "body"))
        if SHAPES[destination][kind].typed:
            fields.insert(0, ("type", literal_const(kind)))
        keep_going = False
        if "continue" in v:
            keep_going = v["continue"].value is True
            if not isinstance(v["continue"].value, bool):
                d.add(v["continue"], join(ip, "continue"), "expected true or false")
        return _Rule(
            name,
            when,
            kind,
            fuse(build_object(fields, None)),
            None,
            detail,
            override_by,
            overrides,
            keep_going,
            body_checker(destination, kind),
        )

    def _overrides(self, node: YNode, ip: str, shape: Shape) -> tuple[Fn | None, dict[str, _Override], set[str]]:
        d = self.diags
        out: dict[str, _Override] = {}
        if not node.is_map or not d.check_keys(node, ip, ("by", "cases"), "'overrides'", required=("by", "cases")):
            if not node.is_map:
                d.add(node, ip, "expected {by: <value, e.g. $.event>, cases: {<name>: {set: {...}} or {drop: ...}}}")
            return None, out, set()
        by = self.expr.value(node.value["by"], join(ip, "by"))
        cases = node.value["cases"]
        if not cases.is_map:
            d.add(cases, join(ip, "cases"), "expected a mapping of value (e.g. event name) to override")
            return by, out, set()
        for key, cn in cases.value.items():
            cp = join(join(ip, "cases"), key)
            if not cn.is_map or not d.check_keys(cn, cp, ("set", "drop"), "an override"):
                if not cn.is_map:
                    d.add(cn, cp, "expected {set: {<output path>: <value>}} or {drop: <reason>}")
                continue
            if ("set" in cn.value) == ("drop" in cn.value):
                # Neither changes nothing, and beside a drop a set is never seen: both are
                # a case left half-written, not one that works.
                d.add(
                    cn, cp, "an override needs exactly one of 'set' (change the output) or 'drop' (discard the event)"
                )
                continue
            drop = None
            if "drop" in cn.value:
                drop = cn.value["drop"].value
                if not isinstance(drop, str) or not drop:
                    d.add(cn.value["drop"], join(cp, "drop"), "expected a reason string")
                    drop = None
            sets: list[tuple[tuple[Segment, ...], Fn]] = []
            if "set" in cn.value:
                sn = cn.value["set"]
                if not sn.is_map:
                    d.add(sn, join(cp, "set"), "expected a mapping of output path (e.g. actions[0].action) to value")
                    continue
                for opath, vn in sn.value.items():
                    try:
                        parsed = parse_path(opath)
                    except PathError as exc:
                        d.add_at(sn.key_pos[opath], join(join(cp, "set"), opath), str(exc))
                        continue
                    if parsed.root != "$" or not parsed.segments:
                        d.add_at(
                            sn.key_pos[opath],
                            join(join(cp, "set"), opath),
                            "expected an output path like actions[0].action",
                        )
                        continue
                    problem = _override_target_problem(parsed.segments, shape)
                    if problem:
                        d.add_at(sn.key_pos[opath], join(join(cp, "set"), opath), problem)
                        continue
                    sets.append((parsed.segments, self.expr.value(vn, join(join(cp, "set"), opath))))
            out[str(key)] = _Override(drop, sets)
        return by, out, set()


_Decider = tuple[int, _Rule, Guard | None]


class _Deciders:
    """The rules so far that decide every event they match (see _covers), indexed so that
    finding the first one that takes all of a later rule's events does not ask each of them:
    asked in turn, a file of a few thousand rules took minutes to check."""

    def __init__(self) -> None:
        self._catch_all: _Decider | None = None
        # (field, value) -> the guarded deciders whose values include it, in rule order
        self._by_value: dict[tuple[str, str], list[_Decider]] = {}

    def add(self, index: int, rule: _Rule, covers: Guard | None) -> None:
        decider = (index, rule, covers)
        if covers is None:
            if self._catch_all is None:
                self._catch_all = decider
            return
        for value in covers[1]:
            self._by_value.setdefault((covers[0], value), []).append(decider)

    def first_covering(self, mine: Guard | None) -> _Decider | None:
        """The earliest decider that takes every event a rule guarded by ``mine`` may match."""
        found = self._catch_all
        if mine is not None and mine[1]:
            field, values = mine
            # A decider covering all of ``values`` is listed under each: read the shortest list.
            listed = min((self._by_value.get((field, v), []) for v in values), key=len)
            for decider in listed:
                covers = decider[2]
                if found is not None and found[0] < decider[0]:
                    break
                if covers is not None and values <= covers[1]:
                    found = decider
                    break
        return found


def _covers(item: YNode, rule: _Rule) -> Guard | Literal[False] | None:
    """What a rule decides for certain: None when every event that reaches it (a
    catch-all), a guard when exactly the events with that top-level field among those
    values (a lone ``match`` such as ``{type: track}``, whose condition is its guard), or
    False when that cannot be said (a ``when``, ``continue: true``, a match on several fields)."""
    v = item.value
    if rule.keep_going or "when" in v:
        return False
    if "match" not in v:
        return None
    match = v["match"]
    if not match.is_map or len(match.value) != 1:
        return False
    guard = guard_of(rule.when)
    return guard if guard is not None else False


def _override_target_problem(segs: tuple[Segment, ...], shape: Shape) -> str:
    """What is wrong with an override's output path for this destination shape, or ''.
    The body is checked against the shape at load; so is what an override writes into it."""
    head = segs[0]
    if head == "type" and shape.typed:
        return "'type' is set from the rule's kind; an override cannot change it"
    if not isinstance(head, str) or head not in shape.fields:
        return f"the output has no field {head!r}{did_you_mean(str(head), shape.fields)}; expected one of: " + (
            ", ".join(shape.fields)
        )
    if head == "actions" and shape.action_fields and len(segs) >= 3 and isinstance(segs[1], int):
        field = segs[2]
        if not isinstance(field, str) or field not in shape.action_fields:
            return (
                f"a MoEngage action has no field {field!r}{did_you_mean(str(field), shape.action_fields)}; "
                f"expected one of: {', '.join(shape.action_fields)}"
            )
    return ""


def _true(env: Env) -> bool:
    return True


def _all(conds: list[Cond]) -> Cond:
    return conjunction(tuple(conds)) if conds else _true


def _set_item(v: Any, fold: bool) -> Any:
    return v.lower() if fold and isinstance(v, str) else v


_ = clone
