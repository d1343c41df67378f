"""An actor's busy time is the union of its shards' spans, however many it holds at once."""

from __future__ import annotations

from raydistill.workflows.cache import _busy_seconds


def test_overlapping_shards_of_one_actor_count_once_and_actors_count_apart():
    busy: dict = {}
    # shards_in_flight = 2: B was sent with A and waited for A's forward; its span covers A's
    spans = [("a", (0.0, 10.0)), ("a", (0.1, 15.0)), ("b", (0.0, 4.0)), ("a", (20.0, 21.0)), ("a", (20.5, 23.0))]
    total = {actor: 0.0 for actor in "ab"}
    for actor, span in spans:
        total[actor] += _busy_seconds(busy, actor, span)
    assert total == {"a": 15.0 + 3.0, "b": 4.0}  # not 10 + 14.9 + 1 + 2.5: the seconds a shard waited are not work
    # a span that arrives after a later one (results come back out of order) adds only what is new
    assert _busy_seconds(busy, "a", (22.0, 22.5)) == 0.0
