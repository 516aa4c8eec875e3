"""A result counts only if the submitting client verified it (issue 31, parts 1, 2 and 5).

Real processes on a pqtls:// cluster (a ``dask scheduler`` with the preload, real nodes,
some of them lying: tests/lying_node.py), real ML-DSA signatures: another client putting
data under the victim's keys, a lone node voting on itself, a patched tally, a result signed
for another submission or by a node in quarantine.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading

import dask
import numpy as np
import pytest
import zarr
from distributed import Client

from rqml_dask import Pipeline, events
from rqml_dask.messages import delivered_as, new_submission
from rqml_dask.pipeline import load_pipeline_config
from rqml_dask.pipeline.verification import OutcomeCheck
from rqml_dask.pipeline.voting import tally_vote
from rqml_dask.trust import ca
from rqml_dask.trust.signing import Seal, SignatureError, Verifier

from conftest import local_cluster, pipeline_dict, write_yaml
from test_scheduler_plugin import run_or_explain
from test_trust import (authority, honest_output, lying_node, pq_scheduler, run_against, start_pq_scheduler,  # noqa: F401  (fixtures)
                        trust_config, trust_env)
from timing import bound, wait_for

pytestmark = pytest.mark.slow


MALLORY = """
import json, sys
from distributed import Client
key, address = tuple(json.loads(sys.argv[1])), sys.argv[2]
forged = {"task_id": "forged", "state": "accepted"}
refusals = []
with Client(address, timeout=60) as mallory:
    [worker] = mallory.scheduler_info()["workers"]
    for attempt in (
        lambda: mallory.scatter({key: forged}, direct=False),
        lambda: mallory.scatter({key: forged}, direct=True),
        lambda: mallory.sync(mallory.scheduler.update_data, who_has={key: [worker]}, nbytes={key: 10}, client=mallory.id),
    ):
        try:
            attempt()
            refusals.append(None)
        except Exception as exc:
            refusals.append(str(exc))
print(json.dumps(refusals))
"""


def test_another_client_cannot_put_data_under_a_running_tasks_keys_and_the_run_stays_honest(
        tmp_path, authority, pq_scheduler, small_volume, honest_output):
    """Mallory, a client of the same CA in a process of her own, knows a running task's Dask
    key (worst case: she read it off the dashboard) and puts a forged "accepted" outcome
    under it, through the scheduler and straight to the node. Every attempt is refused with
    an alert naming her; the victim's run is the honest one."""
    address, _ = pq_scheduler
    config = pipeline_dict(small_volume, tmp_path / "out.zarr")
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", config)))
    with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as alice:
        result: dict = {}
        run = threading.Thread(target=lambda: result.setdefault("report", run_or_explain(pipeline, alice, bound(120))))
        run.start()
        wait_for(lambda: any(isinstance(k, tuple) and k[0] == "rqml" for k in list(alice.futures)), what="the victim's tasks submitted")
        key = next(k for k in list(alice.futures) if isinstance(k, tuple) and k[0] == "rqml")
        attack = subprocess.run([sys.executable, "-c", MALLORY, json.dumps(key), address], capture_output=True, text=True,
                                env={**os.environ, **trust_env(authority, "mallory")}, timeout=bound(120))
        run.join(bound(180))
        report = result["report"]
        alerts = [e for _, e in alice.get_events(events.ALERTS) if e["kind"] == "data-refused"]
    refusals = json.loads(attack.stdout.splitlines()[-1]) if attack.returncode == 0 else attack.stderr
    assert isinstance(refusals, list) and all(r and "may not put data under RQML task keys" in r for r in refusals), refusals
    assert alerts and {a["node_name"] for a in alerts} == {"mallory"}, alerts
    assert all(o.accepted and o.signature["signer"] == "node-a" for o in report.outcomes) and len(report.outcomes) == 8
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert group.attrs["rqml"]["status"] == "complete"
    np.testing.assert_array_equal(group["deconvolved"][...], honest_output)


def test_every_submission_has_keys_of_its_own(tmp_path, small_volume):
    """Two submissions of the same pipeline share no Dask key (nothing to guess from the
    pipeline file), and each is still one RQML task per tile, known by its task key."""
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr"))))
    tasks = pipeline.prepare()
    pipeline.create_output(tasks)
    with local_cluster(1) as cluster, Client(cluster) as client:
        first, second = (pipeline._submit_task(client, tasks[0]) for _ in range(2))
        assert first.result.key[:2] == second.result.key[:2] == ("rqml", tasks[0].key)
        assert first.result.key != second.result.key and len(first.token) == 32
        assert first.result.result().accepted and second.result.result().accepted  # the second joins or reuses the first


def test_the_client_accepts_only_an_outcome_signed_for_its_submission_by_a_node_in_good_standing(tmp_path, small_volume):
    """Real ML-DSA signatures of a real outcome: the client's check takes the one signed by
    a node of the CA for this task and this submission, and refuses every other."""
    directory = tmp_path / "ca"
    ca.init(directory)
    for name in ("node-a", "node-b"):
        ca.issue(directory, name, "node")
    seal = {name: Seal.load(directory / "ca.pem", directory / "issued" / f"{name}.pem", directory / "issued" / f"{name}-key.pem", None)
            for name in ("node-a", "node-b")}
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", pipeline_dict(small_volume, tmp_path / "out.zarr"))))
    task = pipeline.prepare()[0]
    pipeline.create_output([task])
    with local_cluster(1) as cluster, Client(cluster) as client:
        outcome = pipeline._submit_task(client, task).result.result()
    check = OutcomeCheck(Verifier.load(directory / "ca.pem", directory / "crl.pem"))
    mine, other = new_submission(), new_submission()
    signed = seal["node-a"].sign_outcome(outcome, delivered_as(task.key, mine))
    assert check.signer(signed, task.key, mine) == "node-a"
    refusals = {
        "another submission": lambda: check.signer(signed, task.key, other),
        "another task": lambda: check.signer(signed, "other/0@0", mine),
        "a done marker": lambda: check.signer(seal["node-a"].sign_outcome(outcome, task.key), task.key, mine),
        "changed": lambda: check.signer(dataclasses.replace(signed, state="accepted", iterations=1), task.key, mine),
        "unsigned": lambda: check.signer(outcome, task.key, mine),
    }
    reasons = {}
    for what, attempt in refusals.items():
        with pytest.raises(SignatureError) as refused:
            attempt()
        reasons[what] = str(refused.value)
    assert "does not match the record" in reasons["another submission"] and "unsigned" in reasons["unsigned"], reasons
    check.verifier.quarantined["node-a"] = "lost votes"
    with pytest.raises(SignatureError, match="node-a, a node in quarantine"):
        check.signer(signed, task.key, mine)
    by_b = seal["node-b"].sign_outcome(outcome, delivered_as(task.key, mine))
    assert check.signer(by_b, task.key, mine) == "node-b"
    ca.revoke(directory, "node-b")
    with pytest.raises(SignatureError, match="node-b, whose certificate is revoked"):
        check.signer(by_b, task.key, mine)


def test_a_lone_node_cannot_vouch_for_its_own_results(tmp_path, authority, small_volume):
    """One node left, and it lies (its results half again as large; a patched tally in its
    process that accepts everything): every voter runs on it, the client tallies, finds no
    independent voter, and accepts nothing; the output is not complete."""
    address, scheduler = start_pq_scheduler(authority, tmp_path)
    liar = lying_node(authority, address, "node-alone", "wrong-results,patched-tally")
    config = pipeline_dict(small_volume, tmp_path / "out.zarr", validation={"vote_models": ["richardson_lucy"], "vote_tolerance": 0.1})
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", config)))
    try:
        with dask.config.set(trust_config(authority, "alice")), Client(address, timeout=bound(60)) as client:
            wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, what="the node registered")
            report = run_or_explain(pipeline, client, bound(180))
            alerts = [e for _, e in client.get_events(events.ALERTS) if e["kind"] == "no-independent-voter"]
    finally:
        for process in (liar, scheduler):
            process.kill()
    assert len(report.outcomes) == 8 and not any(o.accepted for o in report.outcomes)
    assert all("no independent voter" in o.validation_failures[-1] for o in report.outcomes), report.outcomes[0].validation_failures
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["rqml"]["status"] == "rejected"
    assert len(alerts) == 8 and "a node cannot vouch for itself" in alerts[0]["reason"]


def test_a_tally_counts_a_voter_on_the_results_own_node_as_no_vote(small_volume, tmp_path):
    """The tally (on the client) over real outcomes: a voter from the result's own node
    rejects it, whatever it says; one from another node that agrees accepts it."""
    pipeline = Pipeline(load_pipeline_config(write_yaml(tmp_path / "p.yaml", pipeline_dict(
        small_volume, tmp_path / "out.zarr", validation={"vote_models": ["landweber"], "vote_tolerance": 0.5}))))
    task = pipeline.prepare()[0]
    pipeline.create_output([task])
    with local_cluster(1) as cluster, Client(cluster) as client:
        submission = pipeline._submit_task(client, task)
        outcome, [verdict] = submission.result.result(), [f.result() for f in submission.voters]
    assert verdict.vote["of"] == task.key and verdict.vote["agreed"]  # the voter itself found them close
    alone = tally_vote(task, outcome, "node-a", [(verdict, "node-a")])
    assert not alone.accepted and alone.validation_failures[-1].startswith("vote: landweber ran on node-a, the node whose result")
    assert tally_vote(task, outcome, "node-a", [(verdict, "node-b")]).accepted
    elsewhere = dataclasses.replace(verdict, vote={**verdict.vote, "of": "other/0@0"})
    assert "voted on 'other/0@0'" in tally_vote(task, outcome, "node-a", [(elsewhere, "node-b")]).validation_failures[-1]


@pytest.mark.slow
def test_votes_every_node_loses_quarantine_nobody_then_or_in_a_later_run(tmp_path, authority, pq_scheduler, small_volume):
    """Real processes on pqtls://, two honest nodes (node-a and node-v), the same pipeline run
    twice. First with a vote tolerance no result meets (Landweber voters on RL results, 1e-9):
    every vote is lost, by both nodes, more than ``rqml.scheduler.lost-votes`` in a row; that is
    the tolerance's fault, so no task is accepted and nobody is quarantined. Then with one every
    honest result meets: every task is accepted, and the first run's streaks quarantine nobody."""
    address, _ = pq_scheduler
    node_v = lying_node(authority, address, "node-v", "")  # honest: no attack
    try:
        runs = {}
        for tolerance in (1e-9, 0.5):
            config = pipeline_dict(small_volume, tmp_path / f"out-{tolerance}.zarr",
                                   validation={"vote_models": ["landweber"], "vote_tolerance": tolerance})
            runs[tolerance] = run_against(authority, address, "node-v", config, tmp_path, f"votes-{tolerance}")
    finally:
        node_v.kill()
    (strict, strict_names, _, strict_quarantine), (loose, loose_names, _, loose_quarantine) = runs[1e-9], runs[0.5]
    assert not any(o.accepted for o in strict.outcomes) and len(strict.outcomes) == 8
    assert all("vote" in o.validation_failures[-1] for o in strict.outcomes), strict.outcomes[0].validation_failures
    lost = collections.Counter(strict_names[o.node] for o in strict.outcomes)
    assert set(lost) == {"node-a", "node-v"} and max(lost.values()) >= 3, lost  # both lost votes, one a streak of 3 or more
    assert strict_quarantine == {}
    assert all(o.accepted for o in loose.outcomes) and len(loose.outcomes) == 8
    assert loose_quarantine == {}


def test_lost_vote_streaks_count_per_run_and_tolerance_and_an_old_streak_quarantines_nobody():
    """The real scheduler plugin (in-process, simulated nodes): a node that lost three votes
    in one run at a tolerance no node passed carries nothing into a run with another
    tolerance or another name, is not quarantined for that old streak when other nodes start
    passing, and only a new lost vote in that streak, while another node passes in it,
    quarantines it."""
    import asyncio

    from simulated_nodes import figures
    from test_scheduler_scale import cluster

    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            honest, other, voter = [(await nodes.add(n, figures())).address for n in ("honest", "other", "voter")]
            count = iter(range(10_000))

            def vote(run: str, holder: str, agreed: bool, tolerance: float) -> None:
                key = f"{run}/{next(count)}@0"
                plugin.ledger.accept(key, holder)
                plugin._count_vote({"of": key, "agreed": agreed, "tolerance": tolerance, "difference": 0.2}, voter)

            for _ in range(3):  # three lost in run "a" at tolerance 0.1, while no node passes there: the tolerance's fault
                vote("a", honest, False, 0.1)
            await asyncio.sleep(0.2)  # a quarantine is carried out on the event loop
            assert plugin.gatekeeper.quarantined == {}
            for _ in range(3):  # then other nodes pass theirs, in that streak and in others: the old streak counts for nothing
                vote("a", other, True, 0.1)
                vote("a", other, True, 0.5)
                vote("b", other, True, 0.1)
            vote("b", honest, False, 0.1)  # one lost in run "b": a streak of one there
            vote("a", honest, False, 0.5)  # one at the other tolerance of run "a"
            await asyncio.sleep(0.2)
            assert plugin.gatekeeper.quarantined == {}
            assert plugin.nodes[honest].lost_votes == {("a", 0.1): 3, ("b", 0.1): 1, ("a", 0.5): 1}
            vote("a", honest, False, 0.1)  # a new lost vote in the first streak, while another node passes in it
            await asyncio.sleep(0.2)
            quarantined = dict(plugin.gatekeeper.quarantined)
        assert list(quarantined) == ["honest"] and "4 cross-node votes in a row in run a" in quarantined["honest"]

    asyncio.run(asyncio.wait_for(test(), bound(60)))


def test_a_node_that_presented_its_signed_result_is_not_quarantined_when_dask_gives_the_task_back_to_it():
    """The real scheduler plugin (in-process, a simulated node): Dask takes a task back from
    the node that runs it after the node presented its signed result (here a ``reschedule``;
    in the field a stalled scheduler loop), and gives it back to the same node, which then
    delivers that result: it is taken, and the node stays. A result whose node presented
    nothing still quarantines it (the check is live)."""
    import asyncio

    from simulated_nodes import figures, rqml_graph
    from test_scheduler_scale import cluster, until

    async def test():
        async with cluster() as (scheduler, plugin, nodes, client):
            solo = await nodes.add("solo", figures(concurrency_limit=2))
            plugin.result_check = object()  # as over pqtls: a result counts only once its node presented it signed
            graph, [presented, unpresented] = rqml_graph("run", [((0, 16),), ((16, 32),)])
            futures = client.get(graph, [presented, unpresented], sync=False)
            await until(lambda: presented in solo.running and unpresented in solo.running, "both tasks sent to solo")
            record = plugin.tasks[presented[1]]
            record.verified_by = solo.address  # what handle_result records once the signed outcome checks out
            first_run = solo.running.pop(presented)
            await solo.stream.write([{"op": "reschedule", "key": presented, "stimulus_id": "taken-back"}])
            await until(lambda: solo.running.get(presented, first_run) != first_run, "the task given back to solo")
            await nodes.finish(solo, presented)
            await until(lambda: record.state == "done", "the presented result taken")
            await asyncio.sleep(0.2)  # a quarantine is carried out on the event loop
            assert plugin.gatekeeper.quarantined == {}
            assert plugin.ledger.accepted[presented[1]] == solo.address
            await nodes.finish(solo, unpresented)
            await until(lambda: plugin.gatekeeper.quarantined, "the node that delivered what it never presented shut out")
            assert "without presenting it signed" in plugin.gatekeeper.quarantined["solo"]
            del futures

    asyncio.run(asyncio.wait_for(test(), bound(60)))
