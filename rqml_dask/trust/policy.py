"""Policies signed by the scheduler and checked by its nodes (``pqtls://`` clusters).

The scheduler signs every policy it adopts with its own certificate's ML-DSA-65 key, in the
format of :mod:`rqml_dask.trust.signing`: ``policy.signature`` is ``{"signer", "certificate",
"signed_at", "value"}``, and ``value`` signs :func:`policy_message`: the policy's JSON without
its signature, then ``|rqml-policy|`` and ``repr(signed_at)``.

A node enforces a policy only if the signature verifies against the cluster's CA (the
certificate issued by it, not revoked, valid when it signed), the certificate's role is
``scheduler``, and, once the node is connected, its signer is the scheduler it is connected
to; otherwise :class:`~rqml_dask.trust.signing.SignatureError` says why.
"""

from __future__ import annotations

from dataclasses import replace

from cryptography import x509

from rqml_dask.messages import POLICY, NodePolicy
from rqml_dask.trust.ca import role_of
from rqml_dask.trust.signing import Seal, SignatureError, Verifier


def policy_message(policy: NodePolicy, signed_at: float) -> bytes:
    """The bytes a policy signature is over."""
    return POLICY.dump_json(replace(policy, signature=None)) + f"|rqml-policy|{signed_at!r}".encode()


class PolicySeal(Seal):
    """The scheduler's key and certificate, to sign the policies it adopts."""

    def sign_policy(self, policy: NodePolicy) -> NodePolicy:
        """``policy`` signed by this scheduler now (any earlier signature replaced)."""
        unsigned = replace(policy, signature=None)
        return replace(unsigned, signature=self._signature(lambda signed_at: policy_message(unsigned, signed_at)))


class PolicyVerifier(Verifier):
    """What a node checks the policies it is sent, or saved, against: the cluster's CA."""

    def verify_policy(self, policy: NodePolicy, scheduler: str | None = None) -> str:
        """The signer of ``policy``: a ``scheduler`` certificate of this cluster's CA, and
        ``scheduler`` (the name of the scheduler this node is connected to) if given; else
        :class:`SignatureError` saying why not."""
        signer = self._verify(policy.signature, lambda signed_at: policy_message(policy, signed_at), "policies")
        role = role_of(x509.load_pem_x509_certificate(str(policy.signature["certificate"]).encode()))
        if role != "scheduler":
            raise SignatureError(f"signed by {signer}, whose certificate has role {role}: only a scheduler signs policies")
        if scheduler is not None and signer != scheduler:
            raise SignatureError(f"signed by {signer}, not by {scheduler}, the scheduler this node is connected to")
        return signer
