"""Compile value expressions, conditions and pipe steps from YAML nodes to closures.

Every directive is checked here once; the closures it returns do no parsing and no
dispatch on directive names, which is what makes ``apply`` fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.mapping import steps
from bridge.mapping.fuse import Gen, emits
from bridge.mapping.paths import ParsedPath, PathError, Segment, parse_path
from bridge.mapping.runtime import MISSING, Env, clone, is_empty
from bridge.mapping.yamlnodes import Diagnostics, YNode, did_you_mean, join, kind_of

Fn = Callable[[Env], Any]
Cond = Callable[[Env], bool]

HEADS = ("path", "first", "template", "literal", "if", "cases", "object", "merge")
HEAD_EXTRAS = {
    "path": (),
    "first": (),
    "template": (),
    "literal": (),
    "if": ("then", "else"),
    "cases": ("else",),
    "object": ("rest",),
    "merge": ("prefer",),
}
MODIFIERS = ("pipe", "drop_if", "default")
COMPARE_OPS = (
    "equals",
    "not_equals",
    "in",
    "not_in",
    "prefix",
    "suffix",
    "contains",
    "gt",
    "gte",
    "lt",
    "lte",
    "is",
)
COND_KEYS = ("all", "any", "not", "exists", "empty", "match", "value", *COMPARE_OPS, "ignore_case")


NUL = "\x00"  # joins the keys of an object to search them for a start at once (see _rest)


@dataclass(slots=True)
class Lookup:
    """A lookup table (``table`` with optional ``default``) or a set of ``values``."""

    table: dict[str, Any] | None
    values: tuple[Any, ...] | None
    default: Any = MISSING
    ignore_case: bool = False
    files: tuple[str, ...] = ()


@dataclass(slots=True)
class Scope:
    """Compile-time facts a file's expressions may refer to."""

    lookups: dict[str, Lookup] = field(default_factory=dict)
    # Lookups defined under `lookups` that did not load (a missing or broken file): already
    # reported there, so a use of one is not also an "unknown lookup"
    broken_lookups: set[str] = field(default_factory=set)
    lets: dict[str, Fn] = field(default_factory=dict)  # each let as one fused function
    # ...and as the closure tree it was fused from, for fused code to inline (emit_let)
    let_trees: dict[str, Fn] = field(default_factory=dict)
    # Every name of the `let` section, in file order, and the one being compiled: a use of
    # a let not compiled yet is said as what it is (itself, or one below), not "unknown".
    let_order: list[str] = field(default_factory=list)
    compiling_let: str | None = None


_UNSET = object()


def literal_const(v: Any) -> Fn:
    if type(v) in (dict, list):
        return lambda env: clone(v)
    return _const(v)


def _const(v: Any) -> Fn:
    def emit(g: Gen) -> str:
        name = g.bind(v)
        if v is not MISSING:
            g.present.add(name)
        return name

    return emits(lambda env: v, emit)


def _walk_emitter(start: str, segs: tuple[Segment, ...]) -> Callable[[Gen], str]:
    """``walk(<start>, segs)`` as statements (see fuse.py)."""

    def emit(g: Gen) -> str:
        if start == "e" and segs and isinstance(segs[0], str):
            known = g.path_read(segs)
            if known is not None:  # read on every path to here already
                return known
            out = _walk_event(g, segs)
            g.path_was_read(segs, out)
            return out
        return _walk_lines(g, start, segs, g.fresh())

    return emit


def _walk_event(g: Gen, segs: tuple[Segment, ...]) -> str:
    """``walk(e, segs)`` as statements, ``segs`` starting with a key."""
    # The event is a dict in fused code (Gen.event_is_dict): its first key is read
    # without the check every deeper step makes.
    g.event_is_dict = True
    keys = _key_prefix(segs[:-1])
    for n in range(1, len(keys) + 1):
        g.read_prefix(keys[:n])
    last = segs[-1]
    if isinstance(last, str) and len(keys) == len(segs) - 1 and (*keys, last) in g.hoist:
        return g.hoisted((*keys, last))  # the whole path is a prefix other paths read first
    out = g.fresh()
    held = next((n for n in range(len(keys), 0, -1) if keys[:n] in g.hoist), 0)
    for n in range(len(segs) - 1, held, -1):
        known = g.path_read(segs[:n])
        if known is not None:  # a path read on every path to here holds its start
            return _walk_lines(g, known, segs[n:], out)
    if held and isinstance(segs[held], str):
        # Read once at the function's start (Gen.hoisted); the path goes on from there,
        # its next key read from the value's keys (Gen.hoisted_keys).
        g.line(f"{out} = {g.hoisted_keys(keys[:held])}.get({g.literal(segs[held])}, M)")
        return _walk_lines(g, out, segs[held + 1 :], out)
    if held:
        # Read once at the function's start (Gen.hoisted); an index goes on from there.
        return _walk_lines(g, g.hoisted(keys[:held]), segs[held:], out)
    g.line(f"{out} = e.get({g.literal(segs[0])}, M)")
    return _walk_lines(g, out, segs[1:], out)


def _walk_lines(g: Gen, src: str, rest: tuple[Segment, ...], out: str) -> str:
    """The statements that walk ``rest`` from ``src``, leaving the value in ``out``."""
    for s in rest:
        key = g.literal(s)
        if isinstance(s, str):
            g.line(f"{out} = {src}.get({key}, M) if type({src}) is dict else M")
        else:
            g.line(f"{out} = {src}[{key}] if type({src}) is list and -len({src}) <= {key} < len({src}) else M")
        src = out
    if src != out:
        g.line(f"{out} = {src}")  # no step left: the path is its start
    return out


def _key_prefix(segs: tuple[Segment, ...]) -> tuple[str, ...]:
    """The leading key names of ``segs``, up to its first index."""
    keys: list[str] = []
    for s in segs:
        if not isinstance(s, str):
            break
        keys.append(s)
    return tuple(keys)


class ExprCompiler:
    def __init__(self, diags: Diagnostics, scope: Scope) -> None:
        self.diags = diags
        self.scope = scope
        self.recorders: list[set[tuple[Segment, ...]]] = []
        self.in_each = 0
        # The NAMEs read as $options.NAME; None once the whole $options object is read.
        self.options_read: set[str] | None = set()
        # Where each $options.NAME is first read: a read of an undeclared option is named there.
        self.option_reads: dict[str, tuple[YNode, str]] = {}

    # --- paths ---------------------------------------------------------------

    def parse(self, text: Any, node: YNode, ypath: str) -> ParsedPath | None:
        if not isinstance(text, str):
            # In the file's words ("got a mapping"), not Python's ("got dict").
            self.diags.add(node, ypath, f"expected a path string such as $.a.b, got {kind_of(node)}")
            return None
        try:
            p = parse_path(text)
        except PathError as exc:
            self.diags.add(node, ypath, str(exc))
            return None
        if p.root == "$let":
            name = str(p.segments[0])
            if name not in self.scope.lets:
                self.diags.add(node, ypath, self._unknown_let(name))
                return None
        if p.root == "$options" and p.segments and isinstance(p.segments[0], str):
            self.option_reads.setdefault(p.segments[0], (node, ypath))
        if p.root == "$item" and not self.in_each:
            self.diags.add(node, ypath, "$item is only defined inside an 'each' step")
            return None
        return p

    def _unknown_let(self, name: str) -> str:
        """Why $let.NAME cannot be used here."""
        scope = self.scope
        if name == scope.compiling_let:
            return f"let {name!r} uses itself; a let may only use the lets above it"
        if name in scope.let_order and scope.compiling_let is not None:
            return (
                f"let {name!r} is defined below {scope.compiling_let!r}; a let may only use the lets above it"
                f" (move {name!r} above {scope.compiling_let!r})"
            )
        hint = did_you_mean(name, scope.let_order or scope.lets)
        if scope.compiling_let is None:
            return f"unknown let name {name!r}{hint}; the lets are: {', '.join(scope.let_order) or 'none'}"
        return f"unknown let name {name!r}{hint}; a let may only use names defined above it"

    def path_fn(self, p: ParsedPath) -> Fn:
        segs = p.segments
        if p.root == "$":
            for rec in self.recorders:
                rec.add(segs)
            if len(segs) == 1 and type(segs[0]) is str:
                k = segs[0]

                def get1(env: Env) -> Any:
                    e = env.event
                    return e.get(k, MISSING) if type(e) is dict else MISSING

                return emits(get1, _walk_emitter("e", segs))
            if len(segs) == 2 and type(segs[0]) is str and type(segs[1]) is str:
                k0, k1 = segs

                def get2(env: Env) -> Any:
                    e = env.event
                    if type(e) is not dict:
                        return MISSING
                    v = e.get(k0, MISSING)
                    return v.get(k1, MISSING) if type(v) is dict else MISSING

                return emits(get2, _walk_emitter("e", segs))
            if len(segs) == 3 and all(type(x) is str for x in segs):
                a, b, c = segs

                def get3(env: Env) -> Any:
                    e = env.event
                    if type(e) is not dict:
                        return MISSING
                    v = e.get(a, MISSING)
                    if type(v) is not dict:
                        return MISSING
                    v = v.get(b, MISSING)
                    return v.get(c, MISSING) if type(v) is dict else MISSING

                return emits(get3, _walk_emitter("e", segs))
            return emits(lambda env: walk(env.event, segs), _walk_emitter("e", segs))
        if p.root == "$link":
            return emits(lambda env: walk(env.link, segs), _walk_emitter("env.link", segs))
        if p.root == "$options":
            if segs and isinstance(segs[0], str):
                if self.options_read is not None:
                    self.options_read.add(segs[0])
            else:
                self.options_read = None
            return emits(lambda env: walk(env.options, segs), _walk_emitter("env.options", segs))
        if p.root == "$source":
            return emits(lambda env: walk(env.source, segs), _walk_emitter("env.source", segs))
        if p.root == "$item":
            return emits(lambda env: walk(env.item, segs), _walk_emitter("env.item", segs))
        name = str(segs[0])
        let_fn = self.scope.lets[name]
        let_tree = self.scope.let_trees.get(name)
        rest = segs[1:]

        def emit_let(g: Gen) -> str:
            # the let's cached value, computed on first use (get_let_value below)
            out = g.let_read(name)
            if out is not None:  # read earlier on every path to here: that local holds it
                return _walk_emitter(out, rest)(g) if rest else out
            out = g.fresh()
            key = g.literal(name)
            # `in`, then the item: no method call, and a let not read yet (most are, in a
            # rule's body) costs the one test.
            with g.block(f"if {key} in L:"):
                g.line(f"{out} = L[{key}]")
            with g.block("else:"):
                if let_tree is not None and g.inline_once(name):
                    # The let's own statements, here: a call per let per event was a few
                    # percent of a rule's cost. Only the first read in the generated source
                    # is inlined (one copy of the let's code); reads elsewhere, say in the
                    # other branch of an `if`, call the fused let.
                    outer, g.scope = g.scope, name
                    value = g.value(let_tree)
                    g.scope = outer
                    g.line(f"{out} = L[{key}] = {value}")
                else:
                    g.line(f"{out} = L[{key}] = {g.bind(let_fn)}(env)")
            g.let_was_read(name, out)
            return _walk_emitter(out, rest)(g) if rest else out

        if not rest:

            def get_let_value(env: Env) -> Any:
                cache = env.lets
                v = cache.get(name, _UNSET)
                if v is _UNSET:
                    v = cache[name] = let_fn(env)
                return v

            return emits(get_let_value, emit_let)

        def get_let(env: Env) -> Any:
            cache = env.lets
            v = cache.get(name, _UNSET)
            if v is _UNSET:
                v = cache[name] = let_fn(env)
            return walk(v, rest)

        return emits(get_let, emit_let)

    # --- values --------------------------------------------------------------

    def value(self, node: YNode, ypath: str) -> Fn:
        v = node.value
        if isinstance(v, str):
            if v.startswith("$"):
                p = self.parse(v, node, ypath)
                return self.path_fn(p) if p else _const(MISSING)
            if "{{" in v:
                return self.template(v, node, ypath)
            return _const(v)
        if isinstance(v, list):
            items = [self.value(item, join(ypath, i)) for i, item in enumerate(v)]

            def build_list(env: Env) -> Any:
                out = []
                for f in items:
                    x = f(env)
                    if x is not MISSING:
                        out.append(x)
                return out

            def emit_list(g: Gen) -> str:
                out = g.fresh()
                g.line(f"{out} = []")
                g.present.add(out)
                for f in items:
                    x = g.value(f)
                    g.line(f"{out}.append({x})" if x in g.present else f"if {x} is not M: {out}.append({x})")
                return out

            return emits(build_list, emit_list)
        if isinstance(v, dict):
            return self.directive(node, ypath)
        return _const(v)

    def directive(self, node: YNode, ypath: str) -> Fn:
        keys = node.value
        heads = [k for k in keys if k in HEADS]
        if not heads:
            unknown = [k for k in keys if k not in MODIFIERS]
            found = f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], HEADS)}; " if unknown else ""
            self.diags.add_at(
                node.key_pos[unknown[0]] if unknown else (node.line, node.column),
                join(ypath, unknown[0]) if unknown else ypath,
                f"{found}an expression needs one of: {', '.join(HEADS)} "
                f"(to build an object write 'object: {{...}}', for raw data 'literal: ...')",
            )
            return _const(MISSING)
        if len(heads) > 1:
            self.diags.add(node, ypath, f"one expression may use only one of {', '.join(heads)}")
            return _const(MISSING)
        head = heads[0]
        if not self.diags.check_keys(node, ypath, (head, *HEAD_EXTRAS[head], *MODIFIERS), f"a '{head}' expression"):
            return _const(MISSING)
        fn = getattr(self, "_head_" + head)(node, ypath)
        return self._modifiers(fn, node, ypath)

    def _modifiers(self, fn: Fn, node: YNode, ypath: str) -> Fn:
        keys = node.value
        step_fns: list[steps.Step] = []
        if "pipe" in keys:
            step_fns = steps.compile_pipe(self, keys["pipe"], join(ypath, "pipe"))
        drop_if = ""
        if "drop_if" in keys:
            dn = keys["drop_if"]
            if dn.value not in ("null", "empty", None):
                self.diags.add(dn, join(ypath, "drop_if"), f"expected 'null' or 'empty', got {dn.value!r}")
            drop_if = "null" if dn.value in ("null", None) else "empty"
        default = self.value(keys["default"], join(ypath, "default")) if "default" in keys else None
        if not step_fns and not drop_if and default is None:
            return fn
        if not drop_if and default is None:
            # the common shape "path + a step or two" gets a closure without the general loop
            if len(step_fns) == 1:
                st0 = step_fns[0]

                def one_step(env: Env) -> Any:
                    v = fn(env)
                    return v if v is MISSING or v is None else st0(v, env)

                return emits(one_step, lambda g: _emit_steps(g, fn, step_fns, "", None))
            if len(step_fns) == 2:
                st_a, st_b = step_fns

                def two_steps(env: Env) -> Any:
                    v = fn(env)
                    if v is MISSING or v is None:
                        return v
                    v = st_a(v, env)
                    return v if v is MISSING or v is None else st_b(v, env)

                return emits(two_steps, lambda g: _emit_steps(g, fn, step_fns, "", None))

        def modified(env: Env) -> Any:
            v = fn(env)
            if v is not MISSING and v is not None:
                for st in step_fns:
                    v = st(v, env)
                    if v is MISSING or v is None:
                        break
            if drop_if and (v is None if drop_if == "null" else is_empty(v)):
                v = MISSING
            if v is MISSING and default is not None:
                v = default(env)
            return v

        return emits(modified, lambda g: _emit_steps(g, fn, step_fns, drop_if, default))

    def _head_path(self, node: YNode, ypath: str) -> Fn:
        pn = node.value["path"]
        text = pn.value
        if isinstance(text, str) and not text.startswith("$"):
            text = "$." + text if not text.startswith("[") else "$" + text
        p = self.parse(text, pn, join(ypath, "path"))
        return self.path_fn(p) if p else _const(MISSING)

    def _head_first(self, node: YNode, ypath: str) -> Fn:
        ln = node.value["first"]
        if not ln.is_list or not ln.value:
            self.diags.add(ln, join(ypath, "first"), "expected a non-empty list of values to try in order")
            return _const(MISSING)
        fns = [self.value(item, join(join(ypath, "first"), i)) for i, item in enumerate(ln.value)]

        def first(env: Env) -> Any:
            for f in fns:
                v = f(env)
                if not is_empty(v):
                    return v
            return MISSING

        def emit_first(g: Gen) -> str:
            out = g.fresh()
            g.line(f"{out} = M")
            _emit_first(g, fns, out)
            g.owned.add(out)
            return out

        setattr(first, _FIRST_ITEMS, fns)  # an object's field stores the value itself
        return emits(first, emit_first)

    def _head_template(self, node: YNode, ypath: str) -> Fn:
        tn = node.value["template"]
        if not isinstance(tn.value, str):
            self.diags.add(tn, join(ypath, "template"), "expected a template string like 'Hello {{a.b}}'")
            return _const(MISSING)
        return self.template(tn.value, tn, join(ypath, "template"))

    def template(self, text: str, node: YNode, ypath: str) -> Fn:
        parts: list[Fn] = []
        pos = 0
        while pos < len(text):
            start = text.find("{{", pos)
            if start < 0:
                parts.append(_const(text[pos:]))
                break
            if start > pos:
                parts.append(_const(text[pos:start]))
            end = text.find("}}", start + 2)
            if end < 0:
                self.diags.add(node, ypath, f"unclosed '{{{{' at character {start + 1} of the template")
                return _const(MISSING)
            inner = text[start + 2 : end].strip()
            p = self.parse(inner, node, ypath)
            if p is None:
                return _const(MISSING)
            parts.append(self.path_fn(p))
            pos = end + 2
        from bridge.mapping.runtime import CoercionError, to_string

        def render(env: Env) -> Any:
            out = []
            for f in parts:
                v = f(env)
                if v is MISSING or v is None:
                    continue
                try:
                    out.append(to_string(v))
                except CoercionError:
                    continue
            return "".join(out)

        return render

    def _head_literal(self, node: YNode, ypath: str) -> Fn:
        return literal_const(node.value["literal"].plain())

    def _head_if(self, node: YNode, ypath: str) -> Fn:
        keys = node.value
        cond = self.condition(keys["if"], join(ypath, "if"))
        if "then" not in keys and "else" not in keys:
            self.diags.add(node, ypath, "an 'if' expression needs 'then' and/or 'else'")
        then = self.value(keys["then"], join(ypath, "then")) if "then" in keys else _const(MISSING)
        other = self.value(keys["else"], join(ypath, "else")) if "else" in keys else _const(MISSING)

        def emit_if(g: Gen) -> str:
            out = g.fresh()
            with g.block(f"if {g.cond(cond)}:"):
                g.line(f"{out} = {g.value(then)}")
            with g.block("else:"):
                g.line(f"{out} = {g.value(other)}")
            g.owned.add(out)
            return out

        return emits(lambda env: then(env) if cond(env) else other(env), emit_if)

    def _head_cases(self, node: YNode, ypath: str) -> Fn:
        keys = node.value
        cn = keys["cases"]
        branches: list[tuple[Cond, Fn]] = []
        if not cn.is_list or not cn.value:
            self.diags.add(cn, join(ypath, "cases"), "expected a list of {when: ..., then: ...}")
        else:
            for i, item in enumerate(cn.value):
                ip = join(join(ypath, "cases"), i)
                if not item.is_map:
                    self.diags.add(item, ip, "expected {when: <condition>, then: <value>}")
                    continue
                if not self.diags.check_keys(item, ip, ("when", "then"), "a case", required=("when", "then")):
                    continue
                branches.append(
                    (
                        self.condition(item.value["when"], join(ip, "when")),
                        self.value(item.value["then"], join(ip, "then")),
                    )
                )
        other = self.value(keys["else"], join(ypath, "else")) if "else" in keys else _const(MISSING)

        def choose(env: Env) -> Any:
            for cond, then in branches:
                if cond(env):
                    return then(env)
            return other(env)

        return choose

    def fields(self, node: YNode, ypath: str) -> list[tuple[str, Fn]]:
        if not node.is_map:
            self.diags.add(node, ypath, f"expected a mapping of field name to value, got {kind_of(node)}")
            return []
        return [(k, self.value(v, join(ypath, k))) for k, v in node.value.items()]

    def _head_object(self, node: YNode, ypath: str) -> Fn:
        keys = node.value
        reads: set[tuple[Segment, ...]] = set()
        self.recorders.append(reads)
        try:
            fields = self.fields(keys["object"], join(ypath, "object"))
        finally:
            self.recorders.pop()
        rest = self._rest(keys["rest"], join(ypath, "rest"), reads) if "rest" in keys else None
        return build_object(fields, rest)

    def _rest(self, node: YNode, ypath: str, reads: set[tuple[Segment, ...]]) -> Fn | None:
        omit: set[str] = set()
        prefix = ""
        renames: tuple[tuple[str, str], ...] = ()
        src = node
        if node.is_map:
            keys = ("from", "omit", "prefix", "rename_prefix")
            if not self.diags.check_keys(node, ypath, keys, "'rest'", required=("from",)):
                return None
            src = node.value["from"]
            if "omit" in node.value:
                on = node.value["omit"]
                if not on.is_list or not all(isinstance(x.value, str) for x in on.value):
                    self.diags.add(on, join(ypath, "omit"), "expected a list of key names")
                else:
                    omit = {x.value for x in on.value}
            if "prefix" in node.value:
                pn = node.value["prefix"]
                if not isinstance(pn.value, str) or not pn.value:
                    self.diags.add(pn, join(ypath, "prefix"), f"expected a non-empty string, got {kind_of(pn)}")
                else:
                    prefix = pn.value
            if "rename_prefix" in node.value:
                renames = self._rest_renames(node.value["rename_prefix"], join(ypath, "rename_prefix"))
        if not isinstance(src.value, str) or not src.value.startswith("$"):
            self.diags.add(src, ypath, "expected a path like $.a.b whose unmapped keys pass through")
            return None
        p = self.parse(src.value, src, ypath)
        if p is None:
            return None
        if p.root == "$":
            n = len(p.segments)
            omit |= {str(r[n]) for r in reads if len(r) > n and r[:n] == p.segments and isinstance(r[n], str)}
        getter = self.path_fn(p)
        frozen = frozenset(omit)

        starts = tuple(old for old, _ in renames)

        def renamed(k: str) -> str:
            # The first listed start the key has is replaced (a start names a namespace the
            # destination keeps for itself, such as MoEngage's moe_).
            for old, new in renames:
                if k.startswith(old):
                    return prefix + new + k[len(old) :]
            return prefix + k

        def passed(src_v: Any) -> dict[str, Any]:
            """The keys of ``src_v`` that pass, renamed; {} for a value that is no object."""
            if type(src_v) is not dict:
                return {}
            if not prefix and not renames:
                return {k: v for k, v in src_v.items() if k not in frozen}
            # startswith(()) is False: with no renames each key only gets the prefix.
            return {
                (renamed(k) if k.startswith(starts) else prefix + k): v for k, v in src_v.items() if k not in frozen
            }

        # Nearly every event's object passes whole (the keys read elsewhere are rarely sent
        # too, a key to rename is rare): then it is copied in C, not a Python step a key.
        # Whether a key starts with a start to rename is asked of the keys joined by NULs,
        # one search in C a start (a startswith a key, through map, parsed its arguments
        # each time: 2k instructions an event of three keys). A NUL inside a key can only
        # make it take the slow path, which decides exactly. Fused code asks the same
        # inline, without the two calls a closure costs.
        whole = not prefix
        needles = tuple(NUL + start for start in starts)

        def no_start(src_v: dict[str, Any]) -> bool:
            joined = NUL + NUL.join(src_v)
            return not any(needle in joined for needle in needles)

        def rest(env: Env) -> Any:
            src_v = getter(env)
            if whole and type(src_v) is dict and frozen.isdisjoint(src_v) and (not needles or no_start(src_v)):
                return dict(src_v)
            return passed(src_v)

        def emit_rest(g: Gen) -> str:
            src_v = g.value(getter)
            out = g.fresh()
            if not whole:
                g.line(f"{out} = {g.bind(passed)}({src_v})")
            else:
                tests = [f"type({src_v}) is dict"]
                if frozen:
                    tests.append(f"{g.bind(frozen)}.isdisjoint({src_v})")
                if len(needles) == 1:
                    tests.append(f"{needles[0]!r} not in {NUL!r} + {NUL!r}.join({src_v})")
                elif needles:
                    tests.append(f"{g.bind(no_start)}({src_v})")
                g.line(f"{out} = dict({src_v}) if {' and '.join(tests)} else {g.bind(passed)}({src_v})")
            g.present.add(out)  # always an object
            g.owned.add(out)
            return out

        return emits(rest, emit_rest)

    def _rest_renames(self, node: YNode, ypath: str) -> tuple[tuple[str, str], ...]:
        """``rename_prefix: {moe_: segment_moe_}``: passed keys that start with a listed start
        get the replacement instead of it. Both must be non-empty: an empty start would rename
        every key, and an empty replacement could write a key MoEngage blocks ("")."""
        if not node.is_map or not node.value:
            self.diags.add(node, ypath, f"expected a mapping of key start to its replacement, got {kind_of(node)}")
            return ()
        pairs: list[tuple[str, str]] = []
        for k, v in node.value.items():
            if not k or not isinstance(v.value, str) or not v.value:
                self.diags.add(v, join(ypath, str(k)), "expected a non-empty key start and a non-empty replacement")
                continue
            pairs.append((str(k), v.value))
        return tuple(pairs)

    def _head_merge(self, node: YNode, ypath: str) -> Fn:
        keys = node.value
        ln = keys["merge"]
        if not ln.is_list or not ln.value:
            self.diags.add(ln, join(ypath, "merge"), "expected a list of objects to merge")
            return _const(MISSING)
        fns = [self.value(item, join(join(ypath, "merge"), i)) for i, item in enumerate(ln.value)]
        prefer = "last"
        if "prefer" in keys:
            prefer = keys["prefer"].value
            if prefer not in ("first", "last"):
                self.diags.add(keys["prefer"], join(ypath, "prefer"), f"expected 'first' or 'last', got {prefer!r}")
        order = fns if prefer == "last" else list(reversed(fns))

        def merge(env: Env) -> Any:
            out: dict[str, Any] = {}
            for f in order:
                v = f(env)
                if type(v) is dict:
                    out.update(v)
            return out

        return merge

    # --- conditions ----------------------------------------------------------

    def condition(self, node: YNode, ypath: str) -> Cond:
        from bridge.mapping import conditions

        return conditions.compile_condition(self, node, ypath)

    def lookup(self, node: YNode, ypath: str) -> Lookup | None:
        """A lookup by name (from the ``lookups`` section) or an inline table."""
        if isinstance(node.value, str):
            found = self.scope.lookups.get(node.value)
            if found is None and node.value not in self.scope.broken_lookups:
                self.diags.add(
                    node,
                    ypath,
                    f"unknown lookup {node.value!r}{did_you_mean(node.value, self.scope.lookups)}; "
                    f"define it under 'lookups'",
                )
            return found
        if node.is_map:
            return Lookup({str(k): v.plain() for k, v in node.value.items()}, None)
        self.diags.add(node, ypath, f"expected a lookup name or an inline table, got {kind_of(node)}")
        return None


def build_object(fields: list[tuple[str, Fn]], rest: Fn | None) -> Fn:
    if rest is None:

        def obj(env: Env) -> Any:
            out = {}
            for k, f in fields:
                v = f(env)
                if v is not MISSING:
                    out[k] = v
            return out

        return emits(obj, lambda g: _emit_fields(g, "{}", fields))

    def obj_rest(env: Env) -> Any:
        out = rest(env)
        for k, f in fields:
            v = f(env)
            if v is not MISSING:
                out[k] = v
        return out

    return emits(obj_rest, lambda g: _emit_fields(g, g.value(rest), fields))


# Emitters shared by several nodes (see fuse.py): each restates the closure next to it.
# The items a `first` tries, on its closure: _emit_fields writes a field of one directly.
_FIRST_ITEMS = "_bridge_first_items"


def _emit_fields(g: Gen, start: str, fields: list[tuple[str, Fn]]) -> str:
    if start in g.owned:  # a fresh object (rest's) is filled as it is, not through a copy
        out = start
    else:
        out = g.fresh()
        g.line(f"{out} = {start}")
    if start == "{}" or start in g.present:
        g.present.add(out)
    for k, f in fields:
        tries = getattr(f, _FIRST_ITEMS, None)
        if tries is not None:
            # A `first` sets the field where it finds its value, and leaves it unset when
            # it finds none (its value would be M), with no local to carry the value.
            _emit_first(g, tries, f"{out}[{g.literal(k)}]")
            continue
        v = g.value(f)
        store = f"{out}[{g.literal(k)}] = {v}"
        g.line(store if v in g.present else f"if {v} is not M: {store}")
    g.owned.add(out)
    return out


def _emit_first(g: Gen, fns: list[Fn], out: str) -> None:
    """Statements that set ``out`` (a local, or an object's item) to the first value of
    ``fns`` that is not empty, and leave it as it is when every one is."""
    if not fns:
        return
    v = g.value(fns[0])
    with g.block(f"if not {g.empty(v)}:"):
        g.line(f"{out} = {v}")
    if len(fns) > 1:
        with g.block("else:"):
            _emit_first(g, fns[1:], out)


def _emit_steps(g: Gen, fn: Fn, step_fns: list[steps.Step], drop_if: str, default: Fn | None) -> str:
    out = g.assign(fn)
    depth = g.depth
    for st in step_fns:
        # each step runs only while the value is there, as the closures' loop breaks
        g.line(f"if {out} is not M and {out} is not None:")
        g.depth += 1
        g.line(f"{out} = {g.step(st, out)}")
    g.depth = depth
    if drop_if == "null":
        g.line(f"if {out} is None: {out} = M")
    elif drop_if:
        g.line(f"if {g.empty(out)}: {out} = M")
    if default is not None:
        with g.block(f"if {out} is M:"):
            g.line(f"{out} = {g.value(default)}")
    g.owned.add(out)
    return out


def walk(v: Any, segs: tuple[Segment, ...]) -> Any:
    for s in segs:
        if isinstance(s, str):
            if type(v) is not dict:
                return MISSING
            v = v.get(s, MISSING)
        else:
            if type(v) is not list or not -len(v) <= s < len(v):
                return MISSING
            v = v[s]
    return v
