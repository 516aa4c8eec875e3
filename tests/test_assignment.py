"""Node assignment (NodeTable.choose and its weights) and the Reliability record.

Fast, no cluster: the table is driven directly, with seeded generators, and Reliability is
driven with explicit ``now`` values. Statistical checks use a tolerance of ``SIGMAS``
binomial standard deviations, so with fixed seeds they are deterministic and, with any
other seed, fail by chance with probability well under one in a million per frequency.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from rqml_dask.messages import TaskTraits
from rqml_dask.scheduler.assignment import NodeTable
from rqml_dask.scheduler.reliability import Reliability

SIGMAS = 5.0
TASK = TaskTraits(key="t@0", task_class="deconvolution", model="rl")


def table(*addresses: str, room: float = 1.0) -> NodeTable:
    nodes = NodeTable()
    for address in addresses:
        nodes.add(address)
    nodes.room[:] = room
    return nodes


def draws(nodes: NodeTable, n: int, task: TaskTraits = TASK, seed: int = 0, **kwargs) -> Counter:
    rng = np.random.default_rng(seed)
    return Counter(nodes.choose(task, rng, **kwargs) for _ in range(n))


def assert_frequency(count: int, n: int, p: float) -> None:
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) <= SIGMAS * sigma, f"frequency {count / n:.4f}, expected {p:.4f} +- {SIGMAS * sigma:.4f}"


# -- proportional choice --------------------------------------------------------------------


@pytest.mark.parametrize("via", ["room", "speed"])
def test_choice_is_proportional_to_weight(via):
    nodes = table("a", "b", "c")
    getattr(nodes, via)[:] = [1.0, 3.0, 6.0]
    n = 6000
    counts = draws(nodes, n)
    assert set(counts) == {"a", "b", "c"}
    for address, p in zip("abc", (0.1, 0.3, 0.6)):
        assert_frequency(counts[address], n, p)


def test_weight_is_room_times_speed_times_reliability():
    nodes = table("a", "b", "c")
    nodes.room[:] = [2.0, 1.0, 3.0]
    nodes.speed[:] = [0.5, 2.0, 1.0]
    nodes.reliability[:] = [1.0, 0.5, 0.1]
    np.testing.assert_allclose(nodes.weights(TASK), [1.0, 1.0, 0.3])
    nodes.room[1] = -2.0  # over-bound node: no room, never a negative weight
    np.testing.assert_allclose(nodes.weights(TASK), [1.0, 0.0, 0.3])


def test_node_without_room_is_never_chosen():
    nodes = table("a", "b", "c", room=2.0)
    nodes.room[1] = 0.0
    counts = draws(nodes, 2000)
    assert counts["b"] == 0
    assert counts["a"] > 0 and counts["c"] > 0


def test_none_when_no_node_has_room():
    rng = np.random.default_rng(0)
    assert NodeTable().choose(TASK, rng) is None
    nodes = table("a", "b", room=0.0)
    assert nodes.choose(TASK, rng) is None
    nodes.room[:] = -1.0
    assert nodes.choose(TASK, rng) is None
    nodes.room[:] = 1.0
    nodes.reliability[:] = 0.0
    assert nodes.choose(TASK, rng) is None


# -- warm first -----------------------------------------------------------------------------


def test_warm_nodes_first():
    nodes = table("a", "b", "c", room=2.0)
    nodes.speed[:] = [4.0, 1.0, 4.0]  # the cold nodes are much heavier
    nodes.set_warm("b", ["rl", "landweber"])
    assert draws(nodes, 500) == Counter({"b": 500})
    # a task for a model nobody has warm (or a cold one) is spread by weight
    assert set(draws(nodes, 500, TaskTraits("t", "deconvolution", "wiener"))) == {"a", "b", "c"}


def test_warm_choice_is_proportional_among_warm_nodes():
    nodes = table("a", "b", "c", "d", room=1.0)
    nodes.room[:] = [1.0, 1.0, 3.0, 9.0]
    nodes.set_warm("a", ["rl"])
    nodes.set_warm("c", ["rl"])
    n = 4000
    counts = draws(nodes, n)
    assert set(counts) == {"a", "c"}
    assert_frequency(counts["a"], n, 0.25)


def test_cold_nodes_when_warm_node_has_no_room():
    nodes = table("a", "b", "c", room=2.0)
    nodes.set_warm("b", ["rl"])
    nodes.room[1] = 0.0
    counts = draws(nodes, 1000)
    assert counts["b"] == 0
    assert set(counts) == {"a", "c"}


def test_set_warm_replaces_a_nodes_models():
    nodes = table("a", "b", room=1.0)
    nodes.set_warm("a", ["rl"])
    nodes.set_warm("a", ["landweber"])  # rl no longer warm on a
    assert not nodes.warm["rl"].any()
    assert nodes.warm["landweber"].tolist() == [True, False]
    assert set(draws(nodes, 300)) == {"a", "b"}


# -- GPU routing ----------------------------------------------------------------------------


def test_gpu_only_excludes_cpu_nodes():
    nodes = table("cpu1", "gpu", "cpu2", room=3.0)
    nodes.gpu[1] = True
    assert draws(nodes, 500, gpu_only=True) == Counter({"gpu": 500})
    nodes.room[1] = 0.0  # the GPU node is full: wait rather than fall back to a CPU node
    assert nodes.choose(TASK, np.random.default_rng(0), gpu_only=True) is None
    nodes.gpu[1] = False
    assert nodes.choose(TASK, np.random.default_rng(0), gpu_only=True) is None


def test_gpu_only_beats_warm_cpu_node():
    nodes = table("cpu", "gpu", room=1.0)
    nodes.gpu[1] = True
    nodes.set_warm("cpu", ["rl"])
    assert draws(nodes, 300, gpu_only=True) == Counter({"gpu": 300})


def test_wants_gpu_prefers_gpu_nodes_ten_to_one():
    wants = TaskTraits("t", "deconvolution", "rl", wants_gpu=True)
    nodes = table("cpu", "gpu", room=1.0)
    nodes.gpu[1] = True
    n = 6000
    counts = draws(nodes, n, wants)
    assert_frequency(counts["gpu"], n, nodes.gpu_preference / (nodes.gpu_preference + 1))
    assert counts["cpu"] > 0  # a preference, not a restriction
    # one GPU node against ten equal CPU nodes: an even split
    nodes = table(*(f"cpu{i}" for i in range(10)), "gpu", room=1.0)
    nodes.gpu[10] = True
    counts = draws(nodes, n, wants, seed=1)
    assert_frequency(counts["gpu"], n, 0.5)
    # a task that does not ask for a GPU sees no preference
    counts = draws(nodes, n, seed=2)
    assert_frequency(counts["gpu"], n, 1 / 11)


def test_wants_gpu_without_gpu_nodes_is_spread():
    wants = TaskTraits("t", "deconvolution", "rl", wants_gpu=True)
    nodes = table("a", "b", room=1.0)
    n = 4000
    assert_frequency(draws(nodes, n, wants)["a"], n, 0.5)


# -- avoid ----------------------------------------------------------------------------------


def test_avoided_node_is_passed_over():
    nodes = table("a", "b", "c", room=1.0)
    nodes.room[1] = 10.0  # b is by far the heaviest
    counts = draws(nodes, 1000, avoid=frozenset({"b"}))
    assert counts["b"] == 0 and set(counts) == {"a", "c"}
    assert set(draws(nodes, 1000, avoid=frozenset({"a", "b"}))) == {"c"}


def test_avoided_warm_node_is_passed_over_for_another_warm_node():
    nodes = table("a", "b", "c", room=1.0)
    nodes.set_warm("a", ["rl"])
    nodes.set_warm("b", ["rl"])
    assert draws(nodes, 500, avoid=frozenset({"b"})) == Counter({"a": 500})


def test_avoided_only_warm_node_is_passed_over_for_cold_nodes():
    nodes = table("a", "b", "c", room=1.0)
    nodes.set_warm("b", ["rl"])
    counts = draws(nodes, 1000, avoid=frozenset({"b"}))
    assert counts["b"] == 0 and set(counts) == {"a", "c"}


def test_avoided_node_is_used_when_no_other_has_room():
    nodes = table("a", "b", "c", room=1.0)
    nodes.room[[0, 2]] = 0.0
    assert draws(nodes, 200, avoid=frozenset({"b"})) == Counter({"b": 200})
    nodes.room[:] = 1.0  # all avoided: the choice falls back to every node by weight
    assert set(draws(nodes, 600, avoid=frozenset({"a", "b", "c"}))) == {"a", "b", "c"}


def test_a_node_avoided_and_the_only_one_not_excluded_takes_the_task():
    """A vote must not go to the node holding its result (``exclude``); when it was handed
    back by the only other node (``avoid``), it goes back there rather than waiting for ever."""
    nodes = table("holder", "voter", room=1.0)
    assert draws(nodes, 200, avoid=frozenset({"voter"}), exclude=frozenset({"holder"})) == Counter({"voter": 200})
    nodes.add("third")
    nodes.room[:] = 1.0  # another node not excluded: the avoided one is passed over for it
    assert draws(nodes, 200, avoid=frozenset({"voter"}), exclude=frozenset({"holder"})) == Counter({"third": 200})


def test_avoid_respects_gpu_only_and_unknown_addresses():
    nodes = table("cpu", "gpu", room=1.0)
    nodes.gpu[1] = True
    # avoiding the only GPU node of a gpu-only task never sends it to a CPU node
    assert draws(nodes, 200, gpu_only=True, avoid=frozenset({"gpu"})) == Counter({"gpu": 200})
    # addresses no longer in the table (a removed worker) are ignored
    assert set(draws(nodes, 400, avoid=frozenset({"tcp://gone:1"}))) == {"cpu", "gpu"}


# -- speeds ---------------------------------------------------------------------------------


def test_set_speeds_normalises_to_mean_of_reporting_nodes():
    nodes = table("a", "b", "c")
    nodes.set_speeds({"a": 10.0, "b": 20.0})  # c has not reported
    np.testing.assert_allclose(nodes.speed, [10 / 15, 20 / 15, 1.0])
    nodes.set_speeds({"a": 5.0, "b": 5.0, "c": 0.0, "tcp://gone:1": 99.0})
    np.testing.assert_allclose(nodes.speed, [1.0, 1.0, 1.0])


def test_set_speeds_clips():
    nodes = table(*(f"n{i}" for i in range(10)))
    rates = {f"n{i}": 1.0 for i in range(9)} | {"n9": 1000.0}
    nodes.set_speeds(rates)
    low, high = nodes.speed_bounds
    assert nodes.speed[9] == high
    np.testing.assert_array_equal(nodes.speed[:9], low)
    assert ((nodes.speed >= low) & (nodes.speed <= high)).all()


def test_set_speeds_without_reports_keeps_speeds():
    nodes = table("a", "b")
    nodes.speed[:] = [2.0, 0.5]
    nodes.set_speeds({})
    nodes.set_speeds({"a": 0.0})
    np.testing.assert_array_equal(nodes.speed, [2.0, 0.5])


# -- add / remove ---------------------------------------------------------------------------


def assert_aligned(nodes: NodeTable) -> None:
    n = len(nodes.addresses)
    assert nodes.index == {a: i for i, a in enumerate(nodes.addresses)}
    for array in (nodes.room, nodes.speed, nodes.reliability, nodes.gpu, *nodes.warm.values()):
        assert array.shape == (n,)
    assert nodes.gpu.dtype == bool and all(mask.dtype == bool for mask in nodes.warm.values())


def test_add_is_idempotent_and_new_nodes_start_neutral():
    nodes = table("a")
    nodes.set_warm("a", ["rl"])
    nodes.room[0], nodes.speed[0], nodes.reliability[0], nodes.gpu[0] = 0.0, 2.0, 0.5, True
    nodes.add("a")
    assert nodes.addresses == ["a"] and nodes.room[0] == 0.0
    nodes.add("b")
    assert_aligned(nodes)
    assert (nodes.room[1], nodes.speed[1], nodes.reliability[1], nodes.gpu[1]) == (1.0, 1.0, 1.0, False)
    assert nodes.warm["rl"].tolist() == [True, False]


def test_remove_middle_node_keeps_arrays_aligned():
    nodes = table("a", "b", "c", "d")
    nodes.room[:] = [1.0, 2.0, 3.0, 4.0]
    nodes.speed[:] = [1.0, 1.5, 2.0, 2.5]
    nodes.reliability[:] = [0.9, 0.8, 0.7, 0.6]
    nodes.gpu[:] = [False, True, False, True]
    nodes.set_warm("b", ["rl"])
    nodes.set_warm("c", ["landweber"])
    nodes.set_warm("d", ["rl", "wiener"])
    nodes.remove("b")
    nodes.remove("b")  # unknown: no-op
    nodes.remove("tcp://gone:1")
    assert nodes.addresses == ["a", "c", "d"]
    assert_aligned(nodes)
    np.testing.assert_array_equal(nodes.room, [1.0, 3.0, 4.0])
    np.testing.assert_array_equal(nodes.speed, [1.0, 2.0, 2.5])
    np.testing.assert_array_equal(nodes.reliability, [0.9, 0.7, 0.6])
    assert nodes.gpu.tolist() == [False, False, True]
    assert nodes.warm["rl"].tolist() == [False, False, True]
    assert nodes.warm["landweber"].tolist() == [False, True, False]
    # choose maps weights to the right addresses after the shift
    assert draws(nodes, 300) == Counter({"d": 300})  # rl warm on d only
    assert draws(nodes, 300, TaskTraits("t", "deconvolution", "landweber")) == Counter({"c": 300})
    assert draws(nodes, 300, gpu_only=True) == Counter({"d": 300})
    n = 6000
    counts = draws(nodes, n, TaskTraits("t", "deconvolution", "cold"), seed=3)
    weights = np.array([1.0 * 1.0 * 0.9, 3.0 * 2.0 * 0.7, 4.0 * 2.5 * 0.6])
    for address, p in zip(nodes.addresses, weights / weights.sum()):
        assert_frequency(counts[address], n, p)
    nodes.room[nodes.index["d"]] = 0.0
    assert set(draws(nodes, 300)) == {"a", "c"}  # warm node full: cold ones
    # a node added after a removal lines up too
    nodes.add("e")
    nodes.set_warm("e", ["landweber"])
    assert_aligned(nodes)
    assert nodes.warm["landweber"].tolist() == [False, True, False, True]
    nodes.room[nodes.index["c"]] = 0.0
    assert draws(nodes, 200, TaskTraits("t", "deconvolution", "landweber")) == Counter({"e": 200})


def test_remove_all_nodes():
    nodes = table("a", "b")
    nodes.set_warm("a", ["rl"])
    nodes.remove("a")
    nodes.remove("b")
    assert_aligned(nodes)
    assert nodes.choose(TASK, np.random.default_rng(0)) is None


# -- reliability ----------------------------------------------------------------------------

T0 = 1000.0  # Reliability treats updated_at == 0 as "never updated", so start clocks later


def expected_score(r: Reliability, successes: float, failures: float) -> float:
    return (successes + 1) / (successes + 1 + r.penalty * failures)


def test_fresh_record_scores_one():
    r = Reliability()
    assert r.score(T0) == 1.0
    assert r.score(T0 + 1e6) == 1.0


def test_failures_lower_score_and_back_off():
    r = Reliability()
    scores = []
    for k in range(1, 5):
        r.failure(T0)
        assert r.streak == k
        assert r.backoff_until == T0 + r.backoff_base * 2 ** (k - 1)
        scores.append(r.score(T0))
        assert scores[-1] == pytest.approx(expected_score(r, 0, k) * r.backoff_factor)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4


def test_backoff_multiplies_score_only_while_it_lasts():
    r = Reliability(half_life=1e9)  # no decay: isolate the backoff factor
    r.failure(T0)
    r.failure(T0)  # streak 2: backoff_base * 2 seconds
    base = expected_score(r, 0, 2)
    assert r.score(T0) == pytest.approx(base * r.backoff_factor)
    assert r.score(T0 + 1.999) == pytest.approx(base * r.backoff_factor)
    assert r.score(T0 + 2.0) == pytest.approx(base)
    assert r.score(T0 + 10.0) == pytest.approx(base)


def test_backoff_doubles_with_streak_and_is_capped():
    r = Reliability(backoff_base=1.0, backoff_cap=60.0)
    durations = []
    now = T0
    for _ in range(9):
        r.failure(now)
        durations.append(r.backoff_until - now)
        now += 0.5
    assert durations == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_success_resets_streak():
    r = Reliability()
    for i in range(5):
        r.failure(T0 + i)
    assert r.streak == 5
    r.success(T0 + 100)
    assert r.streak == 0
    r.failure(T0 + 101)  # a new streak starts at the base backoff
    assert r.streak == 1
    assert r.backoff_until == T0 + 101 + r.backoff_base


def test_successes_raise_score():
    r = Reliability(half_life=1e9)
    r.failure(T0)
    after_failure = r.score(T0 + 100)  # out of backoff
    for i in range(10):
        r.success(T0 + 101 + i)
    assert r.score(T0 + 200) > after_failure
    assert r.score(T0 + 200) == pytest.approx(expected_score(r, 10, 1))


def test_score_recovers_with_half_life():
    r = Reliability(half_life=60.0)
    r.failure(T0)
    low = r.score(T0 + r.backoff_base)  # just out of backoff
    assert low == pytest.approx(expected_score(r, 0, 2.0 ** (-r.backoff_base / r.half_life)))
    assert low < 0.26
    previous = low
    for k in range(1, 6):
        now = T0 + k * r.half_life
        score = r.score(now)
        assert score == pytest.approx(expected_score(r, 0, 2.0**-k))  # failures halve per half-life
        assert score > previous
        previous = score
    assert previous > 0.9  # five half-lives after a single failure


def test_score_recovers_toward_one_after_a_failing_streak():
    r = Reliability(half_life=30.0)
    for i in range(3):
        r.failure(T0 + i)
    now = T0 + 2
    assert r.score(now) < 0.01  # three failures, in backoff
    assert r.score(now + 5 * r.half_life) > 0.75
    assert r.score(now + 10 * r.half_life) > 0.99
    assert r.score(now + 30 * r.half_life) == pytest.approx(1.0, abs=1e-6)


def test_score_is_independent_of_how_often_it_is_read():
    a, b = Reliability(), Reliability()
    for r in (a, b):
        r.failure(T0)
        r.success(T0 + 5)
    for t in np.linspace(T0 + 5, T0 + 300, 50):
        a.score(float(t))  # decays in many small steps
    assert a.score(T0 + 300) == pytest.approx(b.score(T0 + 300))


def test_a_success_ends_the_backoff():
    r = Reliability(half_life=1e9)
    r.failure(T0)
    assert r.score(T0 + 0.1) < 0.05
    r.success(T0 + 0.2)
    assert r.score(T0 + 0.3) > 0.3  # no longer multiplied by the backoff factor


def test_a_warm_node_with_only_a_queue_slot_does_not_beat_a_cold_node_that_can_start_now():
    nodes = table("warm", "cold", room=1.0)
    nodes.set_warm("warm", ["rl"])
    nodes.free[nodes.index["warm"]] = 0  # busy: its room is the queue slot
    counts = draws(nodes, 2000, task=TaskTraits("t", "deconvolution", "rl"))
    assert counts["cold"] > 0 and counts["warm"] > 0  # weighted between both, warm not exclusive
    nodes.free[nodes.index["warm"]] = 1  # free to start it: warm first
    assert draws(nodes, 500, task=TaskTraits("t", "deconvolution", "rl")) == Counter({"warm": 500})


def test_excluded_nodes_never_get_the_task_while_another_node_exists():
    nodes = table("a", "b", room=1.0)
    assert draws(nodes, 300, exclude=frozenset({"a"})) == Counter({"b": 300})
    nodes.room[nodes.index["b"]] = 0
    assert nodes.choose(TASK, np.random.default_rng(0), exclude=frozenset({"a"})) is None  # it waits for b
    alone = table("a", room=1.0)
    assert draws(alone, 50, exclude=frozenset({"a"})) == Counter({"a": 50})  # a one-node cluster still runs it
