import pytest

from bridge.mapping.paths import PathError, parse_path


@pytest.mark.parametrize(
    ("text", "root", "segments"),
    [
        ("$.a.b", "$", ("a", "b")),
        ("a.b", "$", ("a", "b")),
        ("$", "$", ()),
        ("$.a[0].b", "$", ("a", 0, "b")),
        ("a[-1]", "$", ("a", -1)),
        ("$['a b'].c", "$", ("a b", "c")),
        ('$.x["k.with.dots"]', "$", ("x", "k.with.dots")),
        ("$link", "$link", ()),
        ("$options.anonymous_ids", "$options", ("anonymous_ids",)),
        ("$let.customer_id", "$let", ("customer_id",)),
        ("$item.sku", "$item", ("sku",)),
    ],
)
def test_parse_path_forms(text, root, segments):
    p = parse_path(text)
    assert (p.root, p.segments) == (root, segments)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$.a[", "unclosed '['"),
        ("$.a[x]", "bad index [x]"),
        ("a..b", "empty key"),
        ("a.", "ends with '.'"),
        ("$nope.a", "unknown path root '$nope'"),
        ("", "empty path"),
        ("$let", "$let needs a name"),
        ("a[0]b", "unexpected 'b'"),
    ],
)
def test_parse_path_errors(text, message):
    with pytest.raises(PathError) as exc:
        parse_path(text)
    assert message in str(exc.value)
