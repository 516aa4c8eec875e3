"""What the client checks of every outcome it gets before it counts it.

On a ``pqtls://`` cluster a node signs each outcome it delivers for one submission
(:func:`~rqml_dask.messages.delivered_as`: the task key and the client's unguessable
submission token). :class:`OutcomeCheck` accepts an outcome only if its signature verifies
against the cluster's CA (the client's own ``rqml.trust.ca``), by a node certificate that is
not revoked (the client's revocation list) and whose node the scheduler has not quarantined
(asked again before the run is finalized), over that task's key and that submission. A
result reused from an earlier run is delivered signed the same way, by the node that checked
its done marker. Over ``tcp://`` there is no identity to check: every outcome is taken as it
is (the README's threat model of the tcp mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from distributed import Client

from rqml_dask.messages import TaskOutcome, delivered_as
from rqml_dask.trust.signing import SignatureError, Verifier
from rqml_dask.trust.transport import Credentials

logger = logging.getLogger(__name__)


@dataclass
class OutcomeCheck:
    """The client's check of outcomes; ``verifier`` is ``None`` where the cluster does not sign."""

    verifier: Verifier | None

    @classmethod
    def for_client(cls, client: Client) -> OutcomeCheck:
        """The check for ``client``'s cluster: signatures over ``pqtls://``, none otherwise."""
        if not str(client.scheduler.address).startswith("pqtls://"):
            return cls(None)
        credentials = Credentials.from_config()
        return cls(Verifier.load(credentials.ca, credentials.crl))

    @property
    def signs(self) -> bool:
        return self.verifier is not None

    def signer(self, outcome: TaskOutcome, task_key: str, submission: str) -> str:
        """The node that signed ``outcome`` as the result of ``task_key`` for ``submission``
        (on a cluster that does not sign: the node the outcome names), or
        :class:`SignatureError` saying why it is not accepted."""
        if self.verifier is None:
            return outcome.node
        return self.verifier.verify_outcome(outcome, delivered_as(task_key, submission))

    def refresh_quarantine(self, client: Client) -> dict[str, str]:
        """Ask the scheduler which nodes it quarantined (name -> reason): what they signed is
        refused from now on. Returns the quarantine."""
        if self.verifier is None:
            return {}
        status = client.sync(client.scheduler.rqml_status, limit=0)
        self.verifier.quarantined.clear()
        self.verifier.quarantined.update(status.get("quarantined") or {})
        return dict(self.verifier.quarantined)


def unverified(task_id: str, reason: str) -> TaskOutcome:
    """The outcome a task gets when no result of it could be verified: not accepted, with
    the reason as its validation failure; nothing of the refused result is kept."""
    return TaskOutcome(task_id=task_id, state="rejected", status="unverified", iterations=0, model="", escalations=0, models=[],
                       convergence=None, validation_failures=[f"result not verified: {reason}"], output="", elapsed_s=0.0,
                       backend="", reason=reason)

