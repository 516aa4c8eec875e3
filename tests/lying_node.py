"""A node that lies about its results: a worker preload (``--preload lying_node``) for the
attack tests of tests/test_trust.py. It holds a genuine node certificate; what it does
wrong is chosen by ``RQML_ATTACK``:

* ``tamper``: changes each outcome after signing it (claims one more iteration);
* ``replay``: records every signed result it presents in ``RQML_ATTACK_FILE`` (honestly)
  until the file ``RQML_ATTACK_FILE.replay`` exists, then presents a recorded one (of the
  same task where it has one) instead of each result it computed;
* ``unsigned``: returns its results without presenting them to the scheduler;
* ``tamper-outbox``: changes each result it finishes without a scheduler after signing it
  (what it reports at reconciliation);
* ``wrong-results``: writes every result of its own half again as large as it computed it
  (and signs it as it is: its signatures verify), but votes honestly on others' results;
* ``patched-tally``: replaces the vote tally in its process with one that accepts everything.

Attacks combine: ``RQML_ATTACK=wrong-results,patched-tally``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from distributed.utils import sync

from rqml_dask.messages import OUTCOME
from rqml_dask.node.plugin import NodePlugin, ResultRefused
from rqml_dask.trust.signing import Seal

ATTACKS = set(os.environ.get("RQML_ATTACK", "").split(","))


def dask_setup(worker) -> None:
    if "tamper" in ATTACKS:
        sign_outcome = Seal.sign_outcome

        def tampered(self, outcome, key):
            signed = sign_outcome(self, outcome, key)
            return dataclasses.replace(signed, iterations=signed.iterations + 1)

        Seal.sign_outcome = tampered
    elif "replay" in ATTACKS:
        record = Path(os.environ["RQML_ATTACK_FILE"])
        present = NodePlugin.present

        def replaying(self, task, outcome, submission):
            if not Path(f"{record}.replay").exists():
                signed = present(self, task, outcome, submission)
                with record.open("a") as file:
                    file.write(json.dumps({"key": task.key, "outcome": OUTCOME.dump_python(signed, mode="json")}) + "\n")
                return signed
            recorded = [json.loads(line) for line in record.read_text().splitlines()]
            old = next((r for r in recorded if r["key"] == task.key), recorded[0])
            answer = sync(self.worker.loop, self.worker.scheduler.rqml_result, key=task.key, submission=submission,
                          outcome=old["outcome"])
            if answer.get("status") != "OK":
                raise ResultRefused(answer.get("reason"))
            return OUTCOME.validate_python(old["outcome"])

        NodePlugin.present = replaying
    elif "unsigned" in ATTACKS:
        NodePlugin.present = lambda self, task, outcome, submission: outcome
    elif "tamper-outbox" in ATTACKS:
        park = NodePlugin._park

        def tampered_park(self, job):
            park(self, job)
            if job.outcome is not None:
                job.outcome = dataclasses.replace(job.outcome, iterations=job.outcome.iterations + 1)

        NodePlugin._park = tampered_park
    if "patched-tally" in ATTACKS:  # accepts every vote, if a tally ever ran here
        from rqml_dask.pipeline import voting

        voting.tally_vote = lambda task, outcome, *rest: dataclasses.replace(outcome, vote={"agreed": True}, state="accepted")
    if "wrong-results" in ATTACKS:
        from rqml_dask.node import plugin

        write_core = plugin.write_core

        def wrong(ref, region, data):
            write_core(ref, region, data if "-vote-" in ref.path else data * 1.5)

        plugin.write_core = wrong
