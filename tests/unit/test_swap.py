"""Swapping versions across replicas (tasks/swap.py), on a fake clock: the first version is committed at once; a
new one only when every live replica has it loaded, then all switch together; a dead replica stops holding the
commit back when its lease runs out; past the prepare timeout a version some replica loaded is committed, one
that none could load never is; and what each replica does next follows from the view."""

import pytest

from raydistill.tasks.swap import SwapCoordinator, replica_action


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def coord(clock):
    c = SwapCoordinator(lease_s=10, prepare_timeout_s=60, clock=clock)
    c.observe(1)
    for r in ("a", "b"):
        c.report(r, serving=1, prepared=None, since=100.0)
    return c


def test_the_first_version_is_committed_at_once():
    c = SwapCoordinator(lease_s=10, prepare_timeout_s=60)
    c.observe(3)
    assert c.view()["committed"] == 3 == c.view()["target"]


def test_a_new_version_is_committed_only_when_every_live_replica_has_it_loaded(coord, clock):
    coord.observe(2)
    assert coord.view() == {"target": 2, "committed": 1, "epoch": 3}
    assert replica_action(coord.view(), serving=1, prepared=None) == ("load", 2)
    clock.t = 5
    coord.report("a", serving=1, prepared=2, since=100.0)
    assert coord.view()["committed"] == 1  # b has not loaded it yet: a keeps serving 1
    assert replica_action(coord.view(), serving=1, prepared=2) is None
    coord.report("b", serving=1, prepared=2, since=100.0)
    assert coord.view()["committed"] == 2 and coord.view()["epoch"] == 4
    assert replica_action(coord.view(), serving=1, prepared=2) == ("switch", 2)  # both, at the same moment
    coord.report("a", serving=2, prepared=None, since=105.0)
    assert coord.status()["mixed_s"] is None  # b still serves 1
    coord.report("b", serving=2, prepared=None, since=105.25)
    assert coord.status()["mixed_s"] == pytest.approx(0.25)
    assert replica_action(coord.view(), serving=2, prepared=None) is None


def test_a_dead_replica_stops_holding_the_commit_back_when_its_lease_runs_out(coord, clock):
    coord.observe(2)
    clock.t = 8
    coord.report("a", serving=1, prepared=2, since=100.0)  # b went silent at t=0
    assert coord.view()["committed"] == 1
    clock.t = 10.5
    coord.report("a", serving=1, prepared=2, since=100.0)
    assert coord.view()["committed"] == 2 and set(coord.live()) == {"a"}


def test_past_the_prepare_timeout_a_version_one_replica_loaded_is_committed(coord, clock):
    coord.observe(2)
    for t in range(0, 61, 5):  # b reports every 5 s but cannot load 2
        clock.t = t
        coord.report("a", serving=1, prepared=2, since=100.0)
        coord.report("b", serving=1, prepared=None, since=100.0, error="OSError: disk full")
    assert coord.view()["committed"] == 2
    assert replica_action(coord.view(), serving=1, prepared=None) == ("load", 2)  # b keeps trying


def test_a_version_no_replica_can_load_is_never_committed_and_the_status_says_why(coord, clock):
    coord.observe(2)
    for t in range(0, 91, 5):
        clock.t = t
        for r in ("a", "b"):
            coord.report(r, serving=1, prepared=None, since=100.0, error="KeyError: 'model.safetensors'")
    status = coord.status()
    assert status["committed"] == 1 and "no replica could load version 2" in status["note"]
    assert "KeyError" in status["note"]
    coord.observe(3)  # the alias moves on: a fresh chance
    assert coord.status()["note"] is None and coord.view()["target"] == 3


def test_a_replica_that_starts_later_loads_the_committed_version_first(coord):
    assert replica_action(coord.view(), serving=None, prepared=None) == ("load", 1)
    assert replica_action(coord.view(), serving=None, prepared=1) == ("switch", 1)


def test_replicas_that_started_on_a_version_were_never_mixed():
    c = SwapCoordinator(lease_s=10, prepare_timeout_s=60)
    c.observe(1)
    c.report("a", serving=1, prepared=None, since=None)
    c.report("b", serving=1, prepared=None, since=None)
    assert c.status()["mixed_s"] is None  # nothing switched: no swap to measure
    c.observe(2)
    c.report("a", serving=1, prepared=2)
    c.report("b", serving=1, prepared=2)
    c.report("a", serving=2, prepared=None, since=50.0)
    c.report("b", serving=2, prepared=None, since=50.5)
    c.report("c", serving=2, prepared=None, since=None)  # started later, on 2
    assert c.status()["mixed_s"] == pytest.approx(0.5)


def test_without_live_replicas_a_new_version_is_committed_at_once(clock):
    c = SwapCoordinator(lease_s=10, prepare_timeout_s=60, clock=clock)
    c.observe(1)
    c.report("a", serving=1, prepared=None)
    clock.t = 30  # a is gone
    c.observe(2)
    assert c.view()["committed"] == 2
