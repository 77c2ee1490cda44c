"""The one error hierarchy of pccl.

Every failure a user can see is a :class:`PcclError`. Each subclass says what happened and the
message says what to do. Network input never raises anything else (no KeyError/TypeError from a
malformed frame): decoders turn every defect into :class:`ProtocolError`.
"""
from __future__ import annotations


class PcclError(Exception):
    """Base class of every pccl error."""


class PeerFailure(PcclError):
    """A peer died, left or a link broke during (or before) an operation.

    The caller's input is unchanged. Call ``update_topology()`` and retry.
    """


class Aborted(PcclError):
    """The master aborted the operation (another participant failed or timed out).

    The caller's input is unchanged. Call ``update_topology()`` and retry.
    """


class MasterLost(Aborted):
    """The control connection to the master broke (it died or restarted) while this call ran.

    Retryable (a subclass of :class:`Aborted`): the operation was aborted on this peer and its
    input restored; the peer re-registers in the background. ``update_topology()`` waits for the
    reconnection and re-forms the group; then retry. When no master answers within
    ``Config.master_reconnect_timeout``, calls raise :class:`MasterUnreachable` instead.
    """


class PcclTimeout(PcclError, TimeoutError):
    """A deadline passed before the operation could finish."""


class MasterUnreachable(PcclError):
    """No master answered within the reconnect window (it died for good or the network is cut)."""


class Kicked(PcclError):
    """The master removed this peer (it was declared dead, broke the protocol, or left)."""


class ProtocolError(PcclError):
    """A malformed, oversized or incompatible message or frame."""


class AuthenticationFailed(PcclError):
    """The other side did not prove the shared secret, or this side could not: a wrong or missing
    secret on one side (``secret=`` / ``PCCL_SECRET`` must be the same on the master and every peer).
    The message never contains the secret."""


class InvalidUsage(PcclError):
    """Wrong call order, or arguments that disagree across peers (count, dtype, op)."""


#: Errors after which ``update_topology()`` and a retry of the same call is the right move
#: (MasterLost is an Aborted).
RETRYABLE = (PeerFailure, Aborted)

# Names used on the wire for errors the master reports to peers (see transports.messages).
ERROR_KINDS: dict[str, type[PcclError]] = {
    "peer_failure": PeerFailure,
    "aborted": Aborted,
    "timeout": PcclTimeout,
    "invalid_usage": InvalidUsage,
    "protocol": ProtocolError,
    "kicked": Kicked,
    "auth": AuthenticationFailed,
}


def error_from_kind(kind: str, message: str) -> PcclError:
    """Build the local exception for an error kind sent by the master."""
    return ERROR_KINDS.get(kind, Aborted)(message)
