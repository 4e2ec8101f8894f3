"""Declarative mappings: load, validate, compile and run mappings/*.yaml."""

from bridge.mapping.api import (
    CompiledMapping,
    Diagnostic,
    Discarded,
    Failed,
    MapContext,
    MappingError,
    MapResult,
    Output,
)
from bridge.mapping.fixtures import FixtureReport, run_fixtures
from bridge.mapping.loader import compile_mapping_dir, load_mapping_dir, load_mapping_file
from bridge.mapping.reload import MappingHolder, MappingSet, directory_fingerprint
from bridge.mapping.translate import translate_events

__all__ = [
    "CompiledMapping",
    "Diagnostic",
    "Discarded",
    "Failed",
    "FixtureReport",
    "MapContext",
    "MapResult",
    "MappingError",
    "MappingHolder",
    "MappingSet",
    "Output",
    "compile_mapping_dir",
    "directory_fingerprint",
    "load_mapping_dir",
    "load_mapping_file",
    "run_fixtures",
    "translate_events",
]
