"""Read bridge.yaml: ${ENV} substitution, strict keys, precise errors.

Only this module knows the file format; everything else receives typed objects.
"""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import math
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from bridge.config_values import as_text, spelt_int, type_name
from bridge.destinations.base import ConfigError
from bridge.suggest import did_you_mean
from bridge.value_words import describe, quoted
from bridge.yaml_unique import UniqueKeysLoader, syntax_problem

# The largest integer setting: SQLite's and PostgreSQL's integers are 64-bit.
MAX_INT = 2**63 - 1

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Reader:
    """Typed access to one mapping node of the config, with its dotted location."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            _fail(where, f"expected a mapping, got {type_name(data)}")
        self.data: dict[builtins.str, Any] = data
        self.where = where
        self._seen: set[builtins.str] = set()

    def at(self, key: builtins.str) -> builtins.str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: builtins.str) -> builtins.bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: builtins.str, default: Any = None) -> Any:
        self._seen.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def str(self, key: builtins.str, default: builtins.str | None = None, *, required: bool = False) -> builtins.str:
        value = self.raw(key)
        if value is None or value == "":
            if required or default is None:
                if required:
                    _fail(self.at(key), "is required" + _empty_env_hint(self.data.get(key)))
                return ""
            if value == "" and default:
                # Written but empty, most often a ${VAR} whose variable is empty or unset:
                # taken as the default, `store.url: ${DATABASE_URL}` put each node of a
                # PostgreSQL deployment on a SQLite file of its own, without a word.
                _fail(
                    self.at(key),
                    f"is empty; leave the key out to take its default ({default!r})" + _empty_env_hint(value),
                )
            return default
        return as_text(value, self.at(key))

    def choice(
        self, key: builtins.str, choices: Iterable[builtins.str], default: builtins.str | None = None
    ) -> builtins.str:
        options = list(choices)
        value = self.str(key, default, required=default is None)
        if value not in options:
            _fail(self.at(key), f"must be one of {', '.join(options)}; got {value!r}{did_you_mean(value, options)}")
        return value

    def int(
        self,
        key: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
        default_is: builtins.str = "",
    ) -> builtins.int:
        """``default_is`` says what leaving the key out means when ``default`` does not."""
        value = self.raw(key, default)
        self._refuse_empty(key, default_is or default)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(self.at(key), f"expected an integer, got {describe(value)}")
        if minimum is not None and value < minimum:
            _fail(self.at(key), f"must be at least {minimum}, got {value}")
        # Past 64 bits, a count is no setting but a typo, and it failed only once serving: a
        # batch size SQLite cannot bind (every lease failing), a guard window no deque takes.
        maximum = MAX_INT if maximum is None else maximum
        if value > maximum:
            _fail(self.at(key), f"must be at most {maximum}, got {value}")
        return builtins.int(value)

    def float(
        self, key: builtins.str, default: builtins.float, *, minimum: builtins.float | None = None
    ) -> builtins.float:
        value = self.raw(key, default)
        self._refuse_empty(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(self.at(key), f"expected a number, got {describe(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float
            number = math.inf
        if not math.isfinite(number):
            # YAML's .nan passes every comparison below, and crashed the server when it slept
            # for that long. An infinite one is no setting either: a lease that never ends
            # leaves a crashed node's jobs unsent for good.
            shown = value if isinstance(value, float) else "an integer past the largest number"
            _fail(self.at(key), f"expected a finite number, got {shown}")
        if minimum is not None and number < minimum:
            _fail(self.at(key), f"must be at least {minimum}, got {value}")
        return number

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.raw(key, default)
        self._refuse_empty(key, "true" if default else "false")
        if not isinstance(value, bool):
            _fail(self.at(key), f"expected true or false, got {describe(value)}")
        return value

    def _refuse_empty(self, key: builtins.str, default: object) -> None:
        """An empty value is no number: most often an empty or unset ${VAR}, which must not
        quietly be the default, as a string setting's is not (see ``str``)."""
        if self.data.get(key) == "":
            _fail(self.at(key), f"is empty; leave the key out to take its default ({default})" + _empty_env_hint(""))

    def list(self, key: builtins.str) -> builtins.list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            # A mapping, most often: items written without their "- ".
            hint = " (each item of a list starts with '- ')" if isinstance(value, dict) else ""
            _fail(self.at(key), f"expected a list, got {type_name(value)}{hint}")
        return value

    def str_list(self, key: builtins.str) -> builtins.list[builtins.str]:
        if isinstance(self.data.get(key), str) and self.data[key]:
            # `to: moengage-main`: one name, which must still be a list of one.
            _fail(self.at(key), f"expected a list, got a string (a single item is still a list: [{self.data[key]}])")
        items = self.list(key)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                _fail(f"{self.at(key)}[{i}]", f"expected a non-empty string, got {describe(item)}")
        return items

    def sub(self, key: builtins.str) -> Reader:
        value = self.raw(key, {})
        return Reader(value, self.at(key))

    def mapping(self, key: builtins.str) -> dict[builtins.str, Any]:
        value = self.raw(key, {})
        if not isinstance(value, dict):
            _fail(self.at(key), f"expected a mapping, got {type_name(value)}")
        return value

    def rest(self) -> dict[builtins.str, Any]:
        """The keys not read so far (passed on to a plugin that validates its own)."""
        return {k: v for k, v in self.data.items() if k not in self._seen}

    def refuse_misspellings(self, keys: Collection[builtins.str], *, allowed: Collection[builtins.str] = ()) -> None:
        """Fail on a key that is none of ``keys`` (nor of ``allowed``) but close to one of
        ``keys``. Called before a node's required keys are read: a misspelt one
        (``pasword``) is then named as the unknown key it is, with a hint, instead of the
        error saying the key it was meant to be is missing. Keys close to none are left
        to ``done()``, which names every key the node takes."""
        for key in self.data:
            if key in keys or key in allowed:
                continue
            if hint := did_you_mean(str(key), keys):
                _fail(self.at(str(key)), f"unknown key{hint}")

    def refuse_misplaced(
        self, sections: Mapping[builtins.str, Collection[builtins.str]], known: Collection[builtins.str]
    ) -> None:
        """Fail on a key that is none of ``known`` but a key of one of this node's
        ``sections`` (``retry``: its keys): most often one indented too little."""
        for key in self.data:
            if key in known:
                continue
            section = next((s for s, keys in sections.items() if key in keys), None)
            if section is not None:
                _fail(
                    self.at(str(key)),
                    f"unknown key here; it belongs in {section}, indented under it ({self.at(section)}.{key})",
                )

    def done(
        self,
        also: Collection[builtins.str] = (),
        *,
        takes: builtins.str = "",
        sections: Mapping[builtins.str, Collection[builtins.str]] | None = None,
    ) -> None:
        """Fail on any key that was never read, nor is in ``also`` (keys a plugin reads from
        ``rest()`` itself): unknown keys are errors. With ``takes`` (say "a moengage
        destination"), a key like none of them is answered with every key that node takes.
        ``sections`` names the keys of this node's sections (``retry``: its keys): a key of
        one written here is most often one indented too little, and is said to be so."""
        known = self._seen | set(also)
        self.refuse_misplaced(sections or {}, known)
        for key in self.data:
            if key not in known:
                hint = did_you_mean(str(key), known)
                if not hint and takes:
                    hint = f" ({takes} takes {', '.join(sorted(known))})"
                _fail(self.at(str(key)), f"unknown key{hint}")


def _empty_env_hint(value: Any) -> str:
    return "" if value is None else " (it is empty: is its environment variable set?)"


def _fail(where: str, message: str) -> NoReturn:
    raise ConfigError(f"{where}: {message}")


def substitute_env(text: str, env: Mapping[str, str], where: str = "<config>") -> tuple[str, set[str]]:
    """Replace ${VAR} and ${VAR:-default}; returns the text and the names that were unset.

    A value that lands inside a quoted YAML scalar is escaped for that quoting, so a
    secret containing a quote or a backslash cannot break (or inject into) the file.
    References inside comments are left alone: a comment that says "${VAR}" needs nothing.
    An unquoted reference that is a whole plain scalar goes in as it is when YAML reads it
    back as itself (``port: ${PORT}`` stays a number), else double-quoted: ``abc #def``
    would lose ``#def`` to a comment, ``&x`` would be an anchor. One that is part of a
    larger plain scalar, whose value YAML would misread there, is a ConfigError at ``where``
    and its line, naming the variable (never its value): only quoting the scalar fixes it.
    """
    missing: set[str] = set()
    refs = _references(text)
    values: list[str] = []
    for ref in refs:
        name, default = ref.match.group(1), ref.match.group(2)
        if name in env:
            values.append(env[name])
        elif default is not None:
            values.append(default)
        else:
            missing.add(name)
            values.append("")
    texts = _texts_for(text, refs, values, where)
    out: list[str] = []
    last = 0
    for ref, value in zip(refs, texts, strict=True):
        out += [text[last : ref.match.start()], value]
        last = ref.match.end()
    out.append(text[last:])
    return "".join(out), missing


def env_references(text: str) -> Iterator[tuple[re.Match[str], str]]:
    """Each ${VAR} reference outside comments, with the quote it sits in ('', '"' or "'")."""
    for ref in _references(text):
        yield ref.match, ref.quote


@dataclasses.dataclass(frozen=True)
class _Plain:
    """A plain scalar holding references: its span in the text, and whether it sits in a
    flow collection (where ``,[]{}`` end it too)."""

    start: int
    end: int
    flow: bool


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A ${VAR} reference outside comments: the quote of the scalar holding it ('"', "'",
    or '' for plain and block text) and, in a plain scalar, that scalar."""

    match: re.Match[str]
    quote: str
    plain: _Plain | None


def _references(text: str) -> list[_Ref]:
    """Each ${VAR} reference outside comments, in order, with where it stands."""
    matches = list(_ENV_RE.finditer(text))
    if not matches:
        return []
    # Scanned with each reference as letters of its length, so positions stay and a
    # reference reads as the plain text it is meant to be: `${` in a flow collection
    # would otherwise open a mapping.
    masked = "".join(_masked_pieces(text, matches))
    tokens = _scan(masked)
    refs: list[_Ref] = []
    for match in matches:
        if tokens is None:
            quote, plain = _quoting_at(text, match.start()), None
        else:
            quote, plain = _quoting_in(tokens, text, match.start())
        if quote != "#":
            refs.append(_Ref(match, quote, plain))
    return refs


def _masked_pieces(text: str, matches: list[re.Match[str]]) -> Iterator[str]:
    last = 0
    for match in matches:
        yield text[last : match.start()]
        yield "x" * (match.end() - match.start())
        last = match.end()
    yield text[last:]


# A scanned token: (start, end, style, flow), style None for a plain scalar, the quote or
# block indicator for the others, and "" for a token that is no scalar (an anchor, a tag).
_Token = tuple[int, int, str | None, bool]


def _scan(text: str) -> tuple[list[int], list[_Token]] | None:
    """The tokens YAML's own scanner finds that hold text, sorted (their starts, and
    them). In a block scalar ``#`` and quotes are text, which a line-by-line reading gets
    wrong. None when the text does not scan: then the line-by-line reading decides."""
    tokens: list[_Token] = []
    flow = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.FlowSequenceStartToken | yaml.FlowMappingStartToken):
                flow += 1
            elif isinstance(token, yaml.FlowSequenceEndToken | yaml.FlowMappingEndToken):
                flow -= 1
            elif isinstance(token, yaml.ScalarToken):
                style = None if token.plain else token.style
                tokens.append((token.start_mark.index, token.end_mark.index, style, flow > 0))
            elif isinstance(token, yaml.AnchorToken | yaml.AliasToken | yaml.TagToken):
                tokens.append((token.start_mark.index, token.end_mark.index, "", flow > 0))
    except yaml.YAMLError:
        return None
    return [t[0] for t in tokens], tokens


def _quoting_in(tokens: tuple[list[int], list[_Token]], text: str, pos: int) -> tuple[str, _Plain | None]:
    """The quoting of the scalar holding ``pos`` (with the scalar when it is plain), or
    '#' outside every token (a comment)."""
    starts, spans = tokens
    i = bisect.bisect_right(starts, pos) - 1
    if i < 0 or pos >= spans[i][1]:
        return "#", None
    start, end, style, flow = spans[i]
    if style is None:
        return "", _Plain(start, end, flow)
    if style == "":  # in an anchor or a tag: taken as it is, as before
        return _quoting_at(text, pos), None
    return (style if style in ('"', "'") else ""), None


def _texts_for(text: str, refs: list[_Ref], values: list[str], where: str) -> list[str]:
    """The text each reference is replaced by: its value, escaped for its quoting."""
    texts = list(values)
    in_plain: dict[_Plain, list[int]] = {}
    for i, (ref, value) in enumerate(zip(refs, values, strict=True)):
        if ref.quote == '"':
            texts[i] = value.replace("\\", "\\\\").replace('"', '\\"')
        elif ref.quote == "'":
            texts[i] = value.replace("'", "''")
        elif ref.plain is not None:
            in_plain.setdefault(ref.plain, []).append(i)
    for plain, indices in in_plain.items():
        whole = len(indices) == 1 and refs[indices[0]].match.span() == (plain.start, plain.end)
        if whole:
            i = indices[0]
            if not _reads_as_itself(text, plain, values[i]):
                texts[i] = _double_quoted(values[i])
        else:
            _refuse_misread(text, plain, [(refs[i].match, values[i]) for i in indices], where)
    return texts


def _column(text: str, pos: int) -> int:
    return pos - (text.rfind("\n", 0, pos) + 1)


def _reads_as_itself(text: str, plain: _Plain, value: str) -> bool:
    """Whether YAML reads ``value``, in place of the whole plain scalar, as its very text
    (a number then keeps its type). Not an empty one: YAML reads nothing as null, which a
    setting took for "not given" and so its default (`url: ${DATABASE_URL}` unset put a
    PostgreSQL deployment on SQLite); quoted, it is the empty value the setting refuses."""
    return value != "" and _read_plain(value, _column(text, plain.start), plain.flow) == value


def _refuse_misread(text: str, plain: _Plain, parts: list[tuple[re.Match[str], str]], where: str) -> None:
    """Raise a ConfigError when the values of references in part of a plain scalar would
    change how YAML reads it (a ' #' starting a comment, a ': ' a mapping, a line break),
    naming the first such variable; one by one, then all together."""
    misread = [match for i, (match, _) in enumerate(parts) if not _reads_as_written(text, plain, parts, {i})]
    if not misread and not _reads_as_written(text, plain, parts, set(range(len(parts)))):
        misread = [match for match, _ in parts]
    if not misread:
        return
    pos = misread[0].start()
    line = text.count("\n", 0, pos) + 1
    names = ", ".join(dict.fromkeys(f"${{{m.group(1)}}}" for m in misread))
    raise ConfigError(
        f"{where}:{line}:{_column(text, pos) + 1}: the value of {names} would change how YAML reads this "
        "unquoted scalar: put the whole scalar in double quotes"
    )


def _reads_as_written(text: str, plain: _Plain, parts: list[tuple[re.Match[str], str]], chosen: set[int]) -> bool:
    """Whether the plain scalar, with the values of the ``chosen`` references in place (and
    a marker word for each other one), reads as it does with markers only, each chosen
    marker then replaced by its value. An empty value adds nothing to misread."""
    marker = "bridgeref"
    while marker in text or any(marker in v for _, v in parts):
        marker += "x"
    markers = [f"{marker}{i}x" for i in range(len(parts))]

    def scalar(with_values: set[int]) -> str:
        pieces: list[str] = []
        last = plain.start
        for i, (match, value) in enumerate(parts):
            shown = value if i in with_values or not value else markers[i]
            pieces += [text[last : match.start()], shown]
            last = match.end()
        pieces.append(text[last : plain.end])
        return "".join(pieces)

    column = _column(text, plain.start)
    expected = _read_plain(scalar(set()), column, plain.flow)
    if expected is None:  # cannot be judged: as before, the values go in as they are
        return True
    for i in chosen:
        expected = expected.replace(markers[i], parts[i][1])
    return _read_plain(scalar(chosen), column, plain.flow) == expected


def _read_plain(scalar: str, column: int, flow: bool) -> str | None:
    """What YAML reads ``scalar`` as, at ``column`` (or in a flow collection), when it reads
    it all as one plain scalar; else None."""
    prefix, suffix = ("[", "]") if flow else (" " * column, "")
    try:
        tokens = list(yaml.scan(prefix + scalar + suffix, Loader=yaml.SafeLoader))[1:-1]
    except yaml.YAMLError:
        return None
    if flow:
        if len(tokens) < 2 or not isinstance(tokens[0], yaml.FlowSequenceStartToken):
            return None
        if not isinstance(tokens[-1], yaml.FlowSequenceEndToken):
            return None
        tokens = tokens[1:-1]
    if len(tokens) != 1 or not isinstance(tokens[0], yaml.ScalarToken) or not tokens[0].plain:
        return None
    token = tokens[0]
    if (token.start_mark.index, token.end_mark.index) != (len(prefix), len(prefix) + len(scalar)):
        return None
    return str(token.value)


# Escaped in a double-quoted scalar: YAML folds a line break there into a space, and its
# reader refuses a control character outright.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
_LINE_BREAKS = "\x85\u2028\u2029"


def _double_quoted(value: str) -> str:
    """``value`` as a YAML double-quoted scalar that reads back as exactly ``value``."""
    out: list[str] = []
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c in _LINE_BREAKS or yaml.reader.Reader.NON_PRINTABLE.match(c):
            code = ord(c)
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _quoting_at(text: str, pos: int) -> str:
    """The quote character of the YAML flow scalar open at ``pos`` on its line, '' outside
    quotes, or '#' when ``pos`` is inside a comment."""
    line = text[text.rfind("\n", 0, pos) + 1 : pos]
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote == '"' and c == "\\":
            i += 2
            continue
        if quote == "'" and c == "'" and line[i + 1 : i + 2] == "'":
            i += 2
            continue
        if c in "\"'" and (not quote or c == quote):
            quote = "" if quote else c
        elif c == "#" and not quote and (i == 0 or line[i - 1] in " \t"):
            # YAML starts a comment only at a '#' after whitespace: "a#b" is a plain scalar.
            return "#"
        i += 1
    return quote


class _UniqueKeysLoader(UniqueKeysLoader):
    """SafeLoader refusing a key given twice in one mapping (bridge.yaml_unique): two
    ``store:`` sections, or a secret set twice. (Mapping files refuse duplicates too.)"""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value = super().construct_yaml_int(node)
        except ValueError:
            # Python refuses to read an integer of more than 4300 digits (a denial-of-service
            # guard): a YAML error at its line, not a traceback.
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters is too large", node.start_mark
            ) from None
        # What was written is kept with a number not spelt as its digits: see SpeltInt.
        return spelt_int(value, node.value)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            if isinstance(exc, yaml.YAMLError):
                raise
            # A value its tag does not fit (`!!float`, `!!bool` or `!!timestamp` before a
            # word) raised Python's own error, a traceback quoting the value: a secret, as
            # like as not. A YAML error at its line, naming the tag only.
            raise yaml.constructor.ConstructorError(
                None, None, f"the value is not what its tag {_short_tag(node.tag)} says", node.start_mark
            ) from None


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


_UniqueKeysLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeysLoader.construct_yaml_int)

# PyYAML quotes a tag's, an alias's or an anchor's name whole. An unquoted value starting
# with '!', '*' or '&' (a generated password, say) is read as one: the name is the value.
_YAML_NAMED = re.compile(r"\b(tag handle|tag|alias|anchor) (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")
_YAML_NAMED_HINT = "; a value starting with '!', '*' or '&' needs quotes (YAML reads it as a tag, alias or anchor)"


def _without_names(problem: str) -> str:
    """``problem`` without the names of tags, aliases and anchors PyYAML quotes."""
    unnamed = _YAML_NAMED.sub(r"\1", problem)
    return unnamed if unnamed == problem else unnamed + _YAML_NAMED_HINT


# Far more than any config needs. Read no further: a path naming a device that never ends
# (``--config /dev/zero``) would otherwise take all the memory there is.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config_text(path: str | Path) -> str:
    """The config file's text, or a ConfigError naming the file and what is wrong with it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: cannot read config: larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: config file is not UTF-8 (byte {exc.start})") from None


# PyYAML's words for the mistakes operators make most, with what they most often mean: its
# own say what the parser met, not what to change.
_YAML_HINTS = (
    (
        "mapping values are not allowed here",
        "; most often a key indented deeper than the keys beside it, or a value holding ': ' that needs quotes",
    ),
    ("could not find expected ':'", "; most often a key without its ':', or a quote or bracket left open"),
    ("expected <block end>", "; most often a line indented differently from the lines beside it"),
)


def read_yaml(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """Parse a config file after ${ENV} substitution. Returns (data, unset variable names)."""
    data, missing, _ = read_yaml_and_values(path, env)
    return data, missing


def hide_values(message: str, values: Collection[str]) -> str:
    """``message`` with every word of the ``values`` substituted from the environment
    replaced: an error must not echo one, nor a word of it (a secret). YAML quotes an
    alias or a tag without its * or !, and a message may cut a long value short. Each
    also as an error quotes it (``describe``'s JSON, a ``!r``), where a quote or a
    backslash in it is escaped."""
    parts = {p for value in values for p in (value, *value.split())}
    forms = {
        form
        for part in parts
        for text_of in (part, part[1:], part[:60])
        for form in (text_of, quoted(text_of)[1:-1], repr(text_of)[1:-1])
        if len(form) >= 4
    }
    for form in sorted(forms, key=len, reverse=True):
        message = message.replace(form, "<${VAR} value>")
    return message


def read_yaml_and_values(
    path: str | Path, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], set[str], set[str]]:
    """As ``read_yaml``, with the non-empty values substituted for ${VAR}s (see ``hide_values``)."""
    p = Path(path)
    text = read_config_text(p)
    environ = os.environ if env is None else env
    # Values are escaped for the quoting they land in (see substitute_env).
    substituted = {environ[m.group(1)] for m, _ in env_references(text) if environ.get(m.group(1))}
    text, missing = substitute_env(text, environ, str(p))
    try:
        data = yaml.load(text, Loader=_UniqueKeysLoader)  # a SafeLoader
    except RecursionError:
        # PyYAML builds nested collections recursively: thousands of nested `[` exhaust it.
        raise ConfigError(f"{p}: invalid YAML: collections nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        # Where the construct it was reading began too: a `[` or a quote never closed.
        problem = syntax_problem(exc) if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
        problem += next((hint for words, hint in _YAML_HINTS if words in problem), "")
        if isinstance(exc, yaml.reader.ReaderError):
            # Its text spans two lines and counts characters from the start of the text:
            # say where, as the other YAML errors do, on the one line of a config error.
            before = text[: exc.position]
            where = f"{p}:{before.count(chr(10)) + 1}:{exc.position - before.rfind(chr(10))}"
            problem = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        # A value must not be echoed, nor a word of it: in a file that does not scan as YAML
        # otherwise, an unquoted ${VAR} goes in as it is and may be misread (`*x` is an alias),
        # and YAML quotes a tag up to the first space (`!abc def` names `!abc`).
        problem = hide_values(_without_names(problem), substituted)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type_name(data)}")
    return data, missing, substituted
