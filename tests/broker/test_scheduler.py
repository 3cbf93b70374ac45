"""The scheduler's decisions, driven by a fake clock: no I/O, no HTTP."""

import pytest

from jupyter_elastic_gpu.broker.scheduler import (
    ENDED,
    GRANTED,
    QUEUED,
    Policy,
    RequestError,
    Scheduler,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make(clock, gpus=1, agents=("a1",), **policy):
    s = Scheduler(Policy(**policy), clock=clock)
    for agent in agents:
        s.register_agent(agent, f"{agent}:9000", "cuda", [{"index": i} for i in range(gpus)])
    return s


def test_quota_is_per_user_and_queued_requests_name_their_blockers(clock):
    s = make(clock, gpus=4, default_limit=0.5)
    a1 = s.request("alice", "k1", 0.5)
    a2 = s.request("alice", "k2", 0.25)
    b1 = s.request("bob", "k1", 0.5)
    assert (a1.state, a2.state, b1.state) == (GRANTED, QUEUED, GRANTED)
    assert a2.reason == "quota" and s.blocked_by(a2) == [a1]
    s.release(a1)
    assert a2.state == GRANTED and s.in_use("alice") == 0.25


def test_never_grantable_requests_are_refused(clock):
    s = make(clock, default_limit=1, user_limits={"carol": 4}, max_lease=2)
    with pytest.raises(RequestError) as e:
        s.request("alice", "k", 2)
    assert e.value.status == 403 and "limit of 1" in e.value.message
    with pytest.raises(RequestError) as e:
        s.request("alice", "k", 0.3)
    assert e.value.status == 400 and "not offered" in e.value.message
    s.policy.fractions = (0.25, 4.0)
    with pytest.raises(RequestError) as e:
        s.request("carol", "k", 4)
    assert e.value.status == 403 and "cap on a single lease" in e.value.message


def test_limits_user_override_then_most_generous_group_then_default():
    p = Policy(default_limit=0.25, user_limits={"alice": 0.5}, group_limits={"ml": 2, "cv": 1})
    assert p.limit_for("alice", ["ml"]) == 0.5
    assert p.limit_for("bob", ["ml", "cv"]) == 2
    assert p.limit_for("bob", ["cv", "other"]) == 1
    assert p.limit_for("bob", ["other"]) == 0.25


def test_group_limit_applies_to_requests(clock):
    s = make(clock, gpus=4, default_limit=0.25, group_limits={"ml": 2})
    assert s.request("bob", "k", 2, groups=["ml"]).state == GRANTED
    with pytest.raises(RequestError):
        s.request("eve", "k", 0.5, groups=["art"])


def test_bin_packing_fills_a_gpu_before_starting_the_next(clock):
    s = make(clock, gpus=2, default_limit=8)
    leases = [s.request("u", f"k{i}", f) for i, f in enumerate([0.5, 0.25, 0.25, 0.5])]
    assert [x.gpus for x in leases] == [[0], [0], [0], [1]]
    # Best fit: a 0.5 goes into the half-full GPU 1, keeping nothing fragmented.
    s.release(leases[1])
    quarter = s.request("u", "k5", 0.25)
    assert quarter.gpus == [0]


def test_whole_gpu_leases_take_free_gpus_of_one_agent(clock):
    s = make(clock, gpus=2, agents=("a1", "a2"), default_limit=8)
    small = s.request("u", "k0", 0.25)
    big = s.request("u", "k1", 2)
    assert big.state == GRANTED and big.agent != small.agent and big.gpus == [0, 1]
    assert s.request("u", "k2", 2).state == QUEUED  # 3 free GPUs, but not 2 on one agent
    three = s.request("v", "k", 1.0)
    assert three.state == GRANTED and three.agent == small.agent and three.gpus == [1]


def test_affinity_returns_a_session_to_its_agent_and_gpu(clock):
    s = make(clock, gpus=2, agents=("a1", "a2"), default_limit=8)
    first = s.request("u", "k", 0.25)
    s.release(first)
    s.request("u", "filler", 0.5)  # best fit would now prefer the fuller GPU
    again = s.request("u", "k", 0.25)
    assert (again.agent, again.gpus) == (first.agent, first.gpus)


def test_affinity_from_agent_reported_sessions(clock):
    s = make(clock, gpus=1, agents=("a1", "a2"), default_limit=8)
    s.agent_heartbeat("a2", sessions=[{"session": "k", "user": "u"}])
    assert s.request("u", "k", 0.25).agent == "a2"


def test_fair_queue_round_robin_between_users_fifo_within(clock):
    s = make(clock, gpus=1, default_limit=1)
    hog = s.request("alice", "k0", 1.0)
    waiting = []
    for i in range(3):
        clock.now += 1
        waiting.append(s.request("alice", f"k{i + 1}", 1.0))
    clock.now += 1
    bob = s.request("bob", "b1", 1.0)
    # Bob is served before Alice's second waiter: users take turns.
    assert [s.positions[x.id] for x in waiting + [bob]] == [2, 3, 4, 1]
    assert all(x.reason == "quota" for x in waiting) and bob.reason == "pool"
    s.release(hog)
    assert bob.state == GRANTED  # alice was served last, so bob goes first
    s.release(bob)
    assert waiting[0].state == GRANTED and s.positions[waiting[1].id] == 1


def test_fifo_within_a_user_holds_smaller_later_requests(clock):
    s = make(clock, gpus=1, default_limit=2, fractions=(0.25, 0.5, 1.0))
    s.request("u", "k0", 0.5)
    big = s.request("u", "k1", 1.0)
    small = s.request("u", "k2", 0.25)
    assert big.state == small.state == QUEUED and big.reason == small.reason == "pool"


def test_queue_timeout_and_abandoned_requests(clock):
    s = make(
        clock, gpus=1, queue_timeout=30, lease_heartbeat_timeout=20, agent_heartbeat_timeout=99
    )
    hog = s.request("alice", "k0", 1.0)
    polled = s.request("bob", "b1", 0.5)
    silent = s.request("carol", "c1", 0.5)
    for _ in range(3):
        clock.now += 10
        s.heartbeat(hog)
        s.heartbeat(polled)
        s.tick()
    assert silent.state == ENDED and silent.reason == "abandoned"
    clock.now += 5
    s.tick()
    assert polled.state == ENDED and polled.reason == "timeout" and hog.state == GRANTED


def test_lease_expires_when_heartbeats_stop_and_frees_the_gpu(clock):
    s = make(clock, gpus=1, lease_heartbeat_timeout=10, agent_heartbeat_timeout=99)
    lease = s.request("alice", "k", 1.0)
    waiter = s.request("bob", "k", 1.0)
    clock.now += 5
    s.heartbeat(lease)
    s.heartbeat(waiter)
    clock.now += 9
    s.tick()
    s.heartbeat(waiter)
    assert lease.state == GRANTED
    clock.now += 2
    s.tick()
    assert lease.state == ENDED and lease.reason == "expired" and waiter.state == GRANTED
    with pytest.raises(RequestError) as e:
        s.heartbeat(lease)
    assert e.value.status == 404


def test_dead_agent_ends_its_leases_and_leaves_the_pool(clock):
    s = make(clock, gpus=1, agents=("a1", "a2"), agent_heartbeat_timeout=10)
    on_a1 = s.request("alice", "k", 1.0)
    on_a2 = s.request("bob", "k", 1.0)
    clock.now += 8
    s.agent_heartbeat(on_a2.agent)
    for lease in (on_a1, on_a2):
        s.heartbeat(lease)
    clock.now += 4
    s.tick()
    assert on_a1.state == ENDED and on_a1.reason == "agent-lost" and on_a2.state == GRANTED
    assert s.request("carol", "k", 0.25).state == QUEUED  # the dead agent's GPU is gone
    s.agent_heartbeat(on_a1.agent)
    assert s.leases and all(x.state == GRANTED for x in s.leases.values())


def test_same_session_retry_is_idempotent_other_fraction_conflicts(clock):
    s = make(clock, gpus=1)
    a = s.request("u", "k", 0.5)
    assert s.request("u", "k", 0.5) is a
    with pytest.raises(RequestError) as e:
        s.request("u", "k", 0.25)
    assert e.value.status == 409


def test_lowering_a_limit_ends_requests_that_can_no_longer_be_granted(clock):
    s = make(clock, gpus=1, default_limit=2)
    s.request("u", "k0", 1.0)
    waiting = s.request("u", "k1", 1.0)
    s.policy.default_limit = 0.5
    s.schedule()
    assert waiting.state == ENDED and waiting.reason == "limit"


def test_restart_from_persisted_objects_keeps_leases_and_turns(clock):
    s = make(clock, gpus=1)
    a = s.request("alice", "k", 0.5)
    clock.now += 1
    b = s.request("bob", "k", 0.5)
    restarted = Scheduler(s.policy, list(s.leases.values()), list(s.agents.values()), clock=clock)
    assert set(restarted.leases) == {a.id, b.id}
    restarted.release(a)
    assert restarted.request("carol", "k", 0.5).gpus == [0]
    # alice was served before bob, so she is ahead of bob now
    clock.now += 1
    x, y = restarted.request("bob", "k2", 0.5), restarted.request("alice", "k2", 0.5)
    assert restarted.positions[y.id] < restarted.positions[x.id]
