"""The router as a pure policy: replica views in, a choice out. No network, no clock."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from megaflow.model.router import ReplicaView, RoutePolicy, Router


def _views(*loads: int, capacity: int = 10) -> list[ReplicaView]:
    return [
        ReplicaView(id=f"r{i}", in_flight=0, in_flight_tokens=t, capacity=capacity)
        for i, t in enumerate(loads)
    ]


def test_least_loaded_picks_fewest_in_flight_tokens() -> None:
    router = Router(sticky=False)
    assert router.choose(_views(500, 20, 300), tokens=10).replica == "r1"


def test_least_loaded_weighs_capacity_then_queue_depth() -> None:
    router = Router(sticky=False)
    views = [
        ReplicaView(id="small", in_flight_tokens=100, capacity=1),
        ReplicaView(id="big", in_flight_tokens=100, capacity=4),
    ]
    assert router.choose(views).replica == "big"
    tied = [
        ReplicaView(id="a", in_flight_tokens=0, queued=5, capacity=4),
        ReplicaView(id="b", in_flight_tokens=0, queued=1, capacity=4),
    ]
    assert router.choose(tied).replica == "b"


def test_ties_rotate_instead_of_piling_on_one_replica() -> None:
    router = Router(sticky=False)
    picks = Counter(router.choose(_views(0, 0, 0)).replica for _ in range(30))
    assert picks == Counter({"r0": 10, "r1": 10, "r2": 10})


def test_round_robin_cycles_in_id_order_and_skips_the_ineligible() -> None:
    router = Router(RoutePolicy.ROUND_ROBIN, sticky=False)
    assert [router.choose(_views(900, 0, 0)).replica for _ in range(6)] == [
        "r0",
        "r1",
        "r2",
        "r0",
        "r1",
        "r2",
    ]
    views = _views(0, 0, 0)
    views[1] = ReplicaView(id="r1", healthy=False)
    assert {router.choose(views).replica for _ in range(6)} == {"r0", "r2"}


def test_power_of_two_choices_prefers_the_lighter_and_is_seeded() -> None:
    views = _views(1000, 0, 1000, 1000)
    router = Router(RoutePolicy.P2C, sticky=False, seed=7)
    picks = [router.choose(views).replica for _ in range(400)]
    # r1 wins whenever it is one of the two drawn: half of the six pairs.
    assert 150 < picks.count("r1") < 250
    again = Router(RoutePolicy.P2C, sticky=False, seed=7)
    assert [again.choose(views).replica for _ in range(400)] == picks


def test_sticky_keeps_a_task_on_its_replica_while_healthy_and_not_overloaded() -> None:
    router = Router()
    first = router.choose(_views(0, 0, 0), task_id="t1", tokens=10).replica
    assert first is not None and router.affinity("t1") == first
    # Its replica is now somewhat busier than the others: the task still goes back there.
    views = [
        ReplicaView(
            id=v.id,
            in_flight=1 if v.id == first else 0,
            in_flight_tokens=10 if v.id == first else 5,
            capacity=10,
        )
        for v in _views(0, 0, 0)
    ]
    route = router.choose(views, task_id="t1", tokens=10)
    assert route.replica == first and route.sticky
    # Unhealthy: the task moves, and stays on its new replica.
    views = [ReplicaView(id=v.id, healthy=v.id != first, capacity=10) for v in views]
    moved = router.choose(views, task_id="t1").replica
    assert moved not in (None, first) and router.affinity("t1") == moved


def test_sticky_gives_way_when_its_replica_is_saturated_or_far_busier() -> None:
    router = Router()
    assert router.choose(_views(0, 0), task_id="t", tokens=10).replica == "r0"
    full = [ReplicaView(id="r0", in_flight=10, capacity=10), ReplicaView(id="r1", capacity=10)]
    assert router.choose(full, task_id="t").replica == "r1"
    router = Router()
    assert router.choose(_views(0, 0), task_id="t", tokens=10).replica == "r0"
    busy = [
        ReplicaView(id="r0", in_flight=5, in_flight_tokens=5000, capacity=10),
        ReplicaView(id="r1", in_flight=1, in_flight_tokens=100, capacity=10),
    ]
    assert router.choose(busy, task_id="t", tokens=10).replica == "r1"


def test_sticky_map_is_bounded() -> None:
    router = Router(max_sticky_tasks=3)
    for i in range(10):
        router.choose(_views(0, 0), task_id=f"t{i}")
    assert router.affinity("t0") is None and router.affinity("t9") is not None


def test_no_choice_says_why() -> None:
    router = Router(sticky=False)
    saturated = [ReplicaView(id="a", in_flight=2, capacity=2)]
    assert router.choose(saturated).replica is None
    assert router.choose(saturated).reason == "saturated"
    draining = [ReplicaView(id="a", accepting=False)]
    assert router.choose(draining).reason == "unavailable"
    assert router.choose(_views(0), exclude={"r0"}).reason == "unavailable"
    assert router.choose([]).reason == "unavailable"


def test_unhealthy_replicas_are_a_last_resort_only() -> None:
    router = Router(sticky=False)
    views = [ReplicaView(id="sick", healthy=False, capacity=5)]
    assert router.choose(views).replica == "sick"  # stale health beats failing outright
    views.append(ReplicaView(id="well", in_flight=4, in_flight_tokens=10**6, capacity=5))
    assert all(router.choose(views).replica == "well" for _ in range(5))
    views[1] = ReplicaView(id="well", in_flight=5, capacity=5)
    assert router.choose(views).reason == "saturated"  # wait for the healthy one


_view = st.builds(
    ReplicaView,
    id=st.sampled_from([f"r{i}" for i in range(6)]),
    healthy=st.booleans(),
    accepting=st.booleans(),
    in_flight=st.integers(0, 8),
    in_flight_tokens=st.integers(0, 10_000),
    queued=st.integers(0, 5),
    capacity=st.integers(1, 8),
)


@settings(max_examples=300, deadline=None)
@given(
    views=st.lists(_view, max_size=6, unique_by=lambda v: v.id),
    policy=st.sampled_from(list(RoutePolicy)),
    sticky_to=st.sampled_from([f"r{i}" for i in range(6)]),
    tokens=st.integers(0, 4000),
)
def test_never_routes_to_an_unhealthy_replica_while_a_healthy_one_is_eligible(
    views: list[ReplicaView], policy: RoutePolicy, sticky_to: str, tokens: int
) -> None:
    router = Router(policy, seed=3)
    router._affinity["task"] = sticky_to  # whatever the task was stuck to before
    route = router.choose(views, task_id="task", tokens=tokens)
    open_ = [v for v in views if v.accepting]
    healthy = [v for v in open_ if v.healthy]
    by_id = {v.id: v for v in views}
    if route.replica is None:
        pool = healthy or open_
        assert all(v.in_flight >= v.capacity for v in pool)
        return
    chosen = by_id[route.replica]
    assert chosen.accepting and chosen.in_flight < chosen.capacity
    if healthy:
        assert chosen.healthy


def test_only_has_the_effect_of_choose_with_one_eligible_replica() -> None:
    """The Model Service's fast path (one replica that can take the call) leaves the
    sticky map as `choose` would: the task stuck to it, most recently used, bounded."""
    chosen, only = (Router(sticky=True, max_sticky_tasks=2) for _ in range(2))
    for task, replica in [("a", "r0"), ("b", "r0"), ("a", "r1"), ("c", "r1"), ("a", "r1")]:
        route = chosen.choose([ReplicaView(replica, capacity=4)], task_id=task)
        assert route.replica == replica
        only.only(replica, task)
        assert list(only._affinity.items()) == list(chosen._affinity.items())
