"""Which policy a node enforces: the latest its scheduler sent, and nobody else's.

The scheduler sends its policy on the node's batched stream when the node registers and on
every change (``rqml-policy``); the node enforces it from then on, whatever its version (the
stream keeps the scheduler's order, and the scheduler numbers its policies). The node saves
it (``policy.json``) to go on under it without a scheduler (degraded mode).

Over ``pqtls://`` (a :class:`~rqml_dask.trust.policy.PolicyVerifier`) a policy is trusted
only if a scheduler of the cluster's CA signed it: one sent must be signed by the scheduler
the node is connected to, and a saved one that does not verify is dropped when the node
starts (it goes on under its initial policy until its scheduler sends one). A saved policy
signed by another scheduler is replaced when the node registers, and the node says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rqml_dask.messages import POLICY, NodePolicy
from rqml_dask.trust.policy import PolicyVerifier
from rqml_dask.trust.signing import SignatureError


@dataclass
class PolicyGate:
    """Checks the policies a node is given. ``verifier`` is ``None`` over ``tcp://``, where
    nothing is signed."""

    verifier: PolicyVerifier | None

    def saved(self, policy: NodePolicy | None) -> tuple[NodePolicy | None, str | None]:
        """The saved ``policy`` if the node may enforce it until its scheduler sends one
        (``None`` if not, or if there is none), and why it is dropped (``None``: it is not)."""
        if policy is None or self.verifier is None:
            return policy, None
        try:
            self.verifier.verify_policy(policy)
        except SignatureError as exc:
            return None, f"the saved policy version {policy.version} is not one a scheduler of this cluster signed: {exc}"
        return policy, None

    def received(self, raw: Any, scheduler: str | None) -> NodePolicy:
        """The policy ``raw`` the node was sent by its scheduler, named ``scheduler`` (over
        ``pqtls://``): checked, or :class:`~pydantic.ValidationError` or
        :class:`~rqml_dask.trust.signing.SignatureError` saying why not."""
        policy = POLICY.validate_python(raw)
        if self.verifier is not None:
            self.verifier.verify_policy(policy, scheduler)
        return policy

    @staticmethod
    def replaced(previous: NodePolicy, received: NodePolicy) -> str | None:
        """What the node says when ``received`` replaces ``previous`` that its scheduler did
        not issue: signed by another scheduler, or numbered above the scheduler's own
        (``None``: nothing to say)."""
        was, now = (p.signature.get("signer") if p.signature else None for p in (previous, received))
        if was is not None and was != now:
            return f"dropped policy version {previous.version} signed by {was}: this node's scheduler is {now}"
        if previous.version > received.version:
            return (f"dropped policy version {previous.version}: numbered above the scheduler's own "
                    f"(version {received.version}), it is not the scheduler's")
        return None
