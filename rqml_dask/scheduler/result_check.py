"""What the scheduler plugin checks of a result a node presents before it accepts it.

Over ``pqtls://`` a node signs every outcome it returns (:meth:`~rqml_dask.trust.signing.Seal.sign_outcome`,
over the outcome, the task key and a timestamp) and presents it with ``rqml_result`` before
its Dask task ends; a node back from degraded mode presents the signed outcomes in its
outbox with its reconciliation report. :meth:`ResultCheck.check` refuses (with
:class:`~rqml_dask.trust.signing.SignatureError`, saying why) an outcome that is not of the
task it is presented for, whose signature does not verify against the cluster's CA (or whose
signer is revoked or quarantined), that another node signed than the one presenting it,
that was signed outside the clock-skew window, or whose signature was presented before (a
replay). The scheduler plugin quarantines the presenting node for any of these.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from rqml_dask.messages import OUTCOME, TaskOutcome, task_name
from rqml_dask.trust.signing import SignatureError, Verifier


def read_outcome(outcome: Any, key: str) -> TaskOutcome:
    """The outcome a node presented for task ``key`` (JSON-like), or :class:`SignatureError`
    saying where it does not read as one."""
    try:
        return OUTCOME.validate_python(outcome)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise SignatureError(f"the result of {task_name(key)} does not read as an outcome: "
                             f"{error['msg']} at {'.'.join(map(str, error['loc'])) or 'the top'}") from None


@dataclass
class ResultCheck:
    """Checks presented outcomes against ``verifier``; ``max_skew`` (seconds) bounds how far
    a live result's timestamp may be from the scheduler's clock; the digests of the last
    ``remembered`` signatures are kept to refuse a replay."""

    verifier: Verifier
    max_skew: float
    remembered: int
    seen: OrderedDict[bytes, tuple[str, float]] = field(default_factory=OrderedDict)
    """sha256 of each accepted signature -> (the task key, when it was presented)."""

    def check(self, outcome: TaskOutcome, key: str, presenter: str, *, live: bool, signed_for: str | None = None,
              now: float | None = None) -> None:
        """Accept ``outcome`` as the result of task ``key`` presented by the node named
        ``presenter``, or raise :class:`SignatureError`. ``live``: a result of a task the node
        is running now, signed for one submission (``signed_for``,
        :func:`~rqml_dask.messages.delivered_as`; its timestamp must be within ``max_skew`` of
        now); otherwise one it finished without a scheduler (reconciliation: signed over the
        task key, earlier, not in the future)."""
        now = time.time() if now is None else now
        if outcome.task_id != task_name(key):
            raise SignatureError(f"the result of {task_name(key)} replays an outcome of task {outcome.task_id}")
        digest = hashlib.sha256(str((outcome.signature or {}).get("value")).encode()).digest()
        if (before := self.seen.get(digest)) is not None:
            raise SignatureError(f"the result of {outcome.task_id} replays a signed result presented at "
                                 f"{time.strftime('%H:%M:%S', time.gmtime(before[1]))} UTC")
        signer = self.verifier.verify_outcome(outcome, signed_for or key)
        if signer != presenter:
            raise SignatureError(f"the result of {outcome.task_id} is signed by {signer} but presented by {presenter}")
        signed_at = float(outcome.signature["signed_at"])
        if signed_at > now + self.max_skew:
            raise SignatureError(f"the result of {outcome.task_id} is signed {signed_at - now:.1f} s in the future "
                                 f"(beyond the {self.max_skew:g} s skew window)")
        if live and now - signed_at > self.max_skew:
            raise SignatureError(f"the result of {outcome.task_id} was signed {now - signed_at:.1f} s ago, outside the "
                                 f"{self.max_skew:g} s skew window (replayed?)")
        self.seen[digest] = (key, now)
        while len(self.seen) > self.remembered:
            self.seen.popitem(last=False)
