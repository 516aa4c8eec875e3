"""The cluster's policy as the scheduler plugin sets it: numbered, signed, runnable.

The scheduler alone decides what the policy a node enforces is (``rqml_policy`` proposes one;
:func:`~rqml_dask.messages.read_policy` bounds its fields):

* it numbers every policy it adopts (:func:`issue`): one above the one before, and never
  below the wall clock in milliseconds, so a scheduler started again numbers its policies
  above those of its earlier runs; a caller's ``version`` is ignored;
* on a ``pqtls://`` cluster it signs it with its own certificate
  (:class:`~rqml_dask.trust.policy.PolicySeal`), which nodes check;
* it refuses a policy that leaves no registered node able to run a task class
  (:func:`refusal`), and fails the tasks of a class no node can run once that has lasted
  ``rqml.scheduler.capable-node-grace`` (:func:`no_capable_node`): never a silent hang.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from rqml_dask.messages import POLICY, InvalidPolicy, NodePolicy
from rqml_dask.trust.policy import PolicySeal
from rqml_dask.trust.transport import Credentials


def issue(proposed: NodePolicy, previous: NodePolicy | None, credentials: Credentials | None) -> NodePolicy:
    """``proposed`` as the scheduler adopts it after ``previous``: numbered above it (see
    the module docstring) and, with ``credentials``, signed with those credentials (the scheduler's,
    their files read now: a renewed certificate signs from its renewal on)."""
    version = max((previous.version if previous is not None else 0) + 1, time.time_ns() // 1_000_000)
    policy = replace(proposed, version=version, signature=None)
    if credentials is None:
        return policy
    return PolicySeal.load(credentials.ca, credentials.cert, credentials.key, credentials.crl).sign_policy(policy)


def refusal(policy: NodePolicy, nodes: int, gpu_nodes: int) -> InvalidPolicy | None:
    """Why ``policy`` cannot be adopted on a cluster of ``nodes`` registered nodes, of which
    ``gpu_nodes`` have a GPU (``None``: it can). With no node registered yet, nothing is
    refused: the tasks of a class no node can run fail later (:func:`no_capable_node`)."""
    if policy.gpu_classes and nodes and not gpu_nodes:
        return InvalidPolicy(f"gpu_classes: {list(policy.gpu_classes)} would leave no node able to run "
                             f"{', '.join(policy.gpu_classes)} tasks: none of the {nodes} node(s) has a GPU")
    return None


def no_capable_node(policy: NodePolicy, task_class: str, nodes: int, waited: float) -> str:
    """The error a task of ``task_class`` fails with when no node can run it under ``policy``
    (its class is GPU-only and none of the ``nodes`` registered has a GPU) for ``waited`` seconds."""
    return (f"no node can run {task_class} tasks: the policy's gpu_classes {list(policy.gpu_classes)} places them "
            f"on GPU nodes only, and none of the {nodes} node(s) has had a GPU for {waited:.0f}s; "
            f"set a policy without {task_class} in gpu_classes (rqml_policy) or add a GPU node")


def summary(policy: NodePolicy) -> dict[str, Any]:
    """``policy`` as ``rqml_status`` and ``rqml_policy`` show it: its fields as JSON has them,
    and who signed it (``signed_by``; ``None`` unsigned) in place of the signature."""
    shown = POLICY.dump_python(policy, mode="json")
    del shown["signature"]
    return {**shown, "signed_by": policy.signature.get("signer") if policy.signature else None}
