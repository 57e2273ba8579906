"""The `mapping` demo: JSON pointers set, and bodies the source's own mapping reads back."""

from __future__ import annotations

import random

import orjson

from relay.providers.demo_mapping import mapping_session, set_pointer
from relay.providers.mapping import MappingSettings, resolve


def test_set_pointer_makes_objects_and_unescapes() -> None:
    """`set_pointer` creates the objects on the way, reads ~1 as / and ~0 as ~, copies."""
    start = {"data": {"kept": 1}}
    out = set_pointer(start, "/data/a~1b/c~0d", "x")
    assert out == {"data": {"kept": 1, "a/b": {"c~d": "x"}}}
    assert start == {"data": {"kept": 1}}
    assert resolve(out, "/data/a~1b/c~0d") == "x"
    assert set_pointer({}, "", 5) == 5


def test_unmapped_steps_are_left_out() -> None:
    """A type map without session, readiness or tool types gives only turn bodies."""
    settings = MappingSettings(
        type="/kind",
        session="/s",
        turn="/t",
        error="/e",
        types={"go": "turn.started", "done": "turn.completed"},
    )
    requests = list(mapping_session(settings, random.Random(1), [(1, False), (2, True)]))
    bodies = [orjson.loads(r.body) for r in requests]
    assert [b["kind"] for b in bodies] == ["go", "done", "go", "done"]
    assert len({b["s"] for b in bodies}) == 1
    assert bodies[0]["t"] == bodies[1]["t"] != bodies[2]["t"]
    assert "e" not in bodies[3]
