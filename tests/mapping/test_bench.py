"""The benchmark's two interpreters agree, so its ratio compares like with like."""

from bench.bench_mapping import MAPPING, NaiveInterpreter, main, sample_events
from bridge.mapping import MapContext, load_mapping_file


def test_naive_and_compiled_agree_on_sample_events():
    compiled = load_mapping_file(MAPPING)
    naive = NaiveInterpreter(MAPPING)
    for event in sample_events(400):
        assert compiled.apply(event, MapContext()) == naive.apply(event, MapContext())


def test_bench_runs(capsys):
    assert main(["--events", "300", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "events/s" in out and "ratio" in out


def test_naive_and_compiled_agree_on_renamed_moe_properties():
    """The track rule's rest renames moe_ properties: the naive interpreter restates it."""
    compiled = load_mapping_file(MAPPING)
    naive = NaiveInterpreter(MAPPING)
    for event in sample_events(8):
        event["properties"] |= {"moe_coupon": "SAVE10", "moe_project_name": "shop"}
        assert compiled.apply(event, MapContext()) == naive.apply(event, MapContext())


def test_naive_and_compiled_agree_on_a_renamed_moe_event_name():
    compiled = load_mapping_file(MAPPING)
    naive = NaiveInterpreter(MAPPING)
    for event in sample_events(4):
        event["event"] = "moe_signup"
        assert compiled.apply(event, MapContext()) == naive.apply(event, MapContext())
