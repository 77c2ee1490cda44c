"""The control channel's session with the master as a pure state machine (no sockets, threads or clocks).

How it works
1. A *session* is one control connection on which this peer registered. The shell opens every
   connection itself (zmq's automatic reconnection is off), so a session can never silently
   move to another master process: a ``Kicked`` read on it comes from the master this peer
   registered with, and is final.
2. Phases: ``REGISTERING`` (a fresh connection is open and ``Register`` was sent) → ``CONNECTED``
   (``Registered`` arrived) → on a loss (the connection closed, or the master was silent for
   ``silence`` seconds) ``BACKING_OFF`` → at the attempt time ``REGISTERING`` again → ... Final
   phases: ``GIVEN_UP`` (the window passed without a session: MasterUnreachable), ``KICKED``
   (the master removed this peer, or refused its registration), ``CLOSED``.
3. The first registration may retry within ``first_window`` (the shell passes master_timeout);
   after a session was established, a loss opens a reconnect window of ``window`` seconds
   (``Config.master_reconnect_timeout``; 0 means give up at the first loss). Attempt k of a
   window starts ``min(cap, base * 2**k)`` seconds after the previous one ended (the first one
   ``base`` after the loss); an attempt ends when its connection closes or no ``Registered``
   arrives within ``attempt_timeout``.
4. Every entry point takes ``now`` and returns a list of actions for the shell: ``Attempt``
   (open a fresh connection and send ``Register``), ``Drop`` (close the current connection),
   ``Lost`` (tell the peer its session is gone: fail what is in flight, it is reconnecting),
   ``Fail`` (final: tell the peer why). ``next_deadline()`` says when ``tick`` must run next.
5. A frozen process (``stalled``) does not count its own freeze as the master's silence: after a
   SIGSTOP longer than ``silence`` the master has usually removed this peer, and the ``Kicked``
   waiting on the connection must be read, not lost to a re-registration that would slip the
   peer back into a group that went on without it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

INF = float("inf")


class Phase(enum.Enum):
    REGISTERING = "registering"
    CONNECTED = "connected"
    BACKING_OFF = "backing off"
    GIVEN_UP = "given up"
    KICKED = "kicked"
    CLOSED = "closed"


FINAL = (Phase.GIVEN_UP, Phase.KICKED, Phase.CLOSED)


@dataclass(frozen=True)
class Attempt:
    """Open a fresh connection to the master and send ``Register`` on it."""

    number: int  # 1-based within the current window


@dataclass(frozen=True)
class Drop:
    """Close the current connection (its late messages must not be read)."""


@dataclass(frozen=True)
class Lost:
    """The session is gone and a reconnect window opened; ``reason`` says how it was noticed."""

    reason: str
    window: float


@dataclass(frozen=True)
class Fail:
    """Final. ``kind``: "unreachable" (the window passed), "kicked" (the master removed this peer)
    or "refused" (a reachable master kicked this peer's registration)."""

    kind: str
    reason: str


Action = Attempt | Drop | Lost | Fail


def backoff(attempt: int, base: float, cap: float) -> float:
    """Delay before attempt ``attempt`` (0-based) of a window: ``min(cap, base * 2**attempt)``."""
    if attempt >= 64:
        return cap
    return min(cap, base * (2 ** attempt))


class Session:
    """Decides when to (re)register and when to give up. The shell starts the first attempt
    itself (the constructor puts the machine in ``REGISTERING``)."""

    def __init__(self, now: float, window: float, base: float, cap: float, attempt_timeout: float,
                 silence: float, first_window: float) -> None:
        if window < 0 or base <= 0 or cap < base or attempt_timeout <= 0 or silence <= 0 or first_window <= 0:
            raise ValueError("reconnect parameters: window >= 0, 0 < base <= cap, timeouts > 0")
        self.window, self.base, self.cap = window, base, cap
        self.attempt_timeout, self.silence = attempt_timeout, silence
        self.phase = Phase.REGISTERING
        self.ever_connected = False
        self.failed_attempts = 0  # in the current window
        self.attempts = 1  # started in the current window
        self.window_end = now + first_window
        self.attempt_end = now + min(attempt_timeout, first_window)
        self.next_attempt = INF
        self.last_heard = now
        self.lost_reason = ""  # why the current window opened
        self.sessions = 0  # sessions established so far

    # ------------------------------------------------------------------ inputs
    def heard(self, now: float) -> None:
        """Any message arrived on the current connection (proves the master alive)."""
        self.last_heard = now

    def stalled(self, now: float, seconds: float) -> None:
        """This process did not run for ``seconds`` (SIGSTOP, a debugger, swapping, starvation):
        that time is not the master's silence. While connected, the silence clock stands still
        for it, so a revived peer first reads what the master sent meanwhile (a ``Kicked`` is then
        final) instead of taking its own freeze for a lost master and re-registering."""
        if self.phase is Phase.CONNECTED and seconds > 0:
            self.last_heard = min(now, self.last_heard + seconds)

    def registered(self, now: float) -> list[Action]:
        """``Registered`` arrived on the current connection."""
        if self.phase is not Phase.REGISTERING:
            return []
        self.phase = Phase.CONNECTED
        self.ever_connected = True
        self.sessions += 1
        self.last_heard = now
        self.failed_attempts = 0
        self.attempts = 0
        self.window_end = self.attempt_end = self.next_attempt = INF
        return []

    def kicked(self, now: float, reason: str) -> list[Action]:
        """``Kicked`` arrived on the current connection."""
        if self.phase is Phase.CONNECTED:
            self.phase = Phase.KICKED
            return [Fail("kicked", reason)]
        if self.phase is Phase.REGISTERING:
            self.phase = Phase.KICKED
            return [Drop(), Fail("refused", reason)]
        return []

    def connection_lost(self, now: float, reason: str) -> list[Action]:
        """The current connection closed (refused, reset or closed by the master)."""
        if self.phase is Phase.CONNECTED:
            return self._lose(now, reason)
        if self.phase is Phase.REGISTERING:
            return self._attempt_failed(now, reason)
        return []

    def close(self) -> list[Action]:
        if self.phase in FINAL:
            self.phase = Phase.CLOSED
            return []
        self.phase = Phase.CLOSED
        return [Drop()]

    def tick(self, now: float) -> list[Action]:
        if self.phase is Phase.CONNECTED:
            if now - self.last_heard > self.silence:
                return self._lose(now, f"no message from the master for {now - self.last_heard:.1f}s "
                                       f"(master_timeout {self.silence}s)")
            return []
        if self.phase is Phase.REGISTERING:
            if now >= self.window_end:
                return self._give_up([Drop()])
            if now >= self.attempt_end:
                return self._attempt_failed(now, f"no answer to the registration within {self.attempt_timeout}s")
            return []
        if self.phase is Phase.BACKING_OFF:
            if now >= self.window_end:
                return self._give_up([])
            if now >= self.next_attempt:
                self.phase = Phase.REGISTERING
                self.attempts += 1
                self.attempt_end = now + self.attempt_timeout
                return [Attempt(self.attempts)]
        return []

    def next_deadline(self) -> float:
        if self.phase is Phase.CONNECTED:
            return self.last_heard + self.silence
        if self.phase is Phase.REGISTERING:
            return min(self.attempt_end, self.window_end)
        if self.phase is Phase.BACKING_OFF:
            return min(self.next_attempt, self.window_end)
        return INF

    # ------------------------------------------------------------------ transitions
    def _lose(self, now: float, reason: str) -> list[Action]:
        self.lost_reason = reason
        if self.window <= 0:
            self.phase = Phase.GIVEN_UP
            return [Drop(), Fail("unreachable", reason)]
        self.phase = Phase.BACKING_OFF
        self.failed_attempts = 0
        self.attempts = 0
        self.window_end = now + self.window
        self.next_attempt = now + backoff(0, self.base, self.cap)
        return [Drop(), Lost(reason, self.window)]

    def _attempt_failed(self, now: float, reason: str) -> list[Action]:
        if not self.lost_reason:
            self.lost_reason = reason
        self.failed_attempts += 1
        if now >= self.window_end:
            return self._give_up([Drop()])
        self.phase = Phase.BACKING_OFF
        self.next_attempt = now + backoff(self.failed_attempts, self.base, self.cap)
        return [Drop()]

    def _give_up(self, actions: list[Action]) -> list[Action]:
        self.phase = Phase.GIVEN_UP
        what = "a reconnection" if self.ever_connected else "a registration"
        return actions + [Fail("unreachable", f"{self.attempts} attempt(s) at {what} failed within the window; "
                                              f"first: {self.lost_reason}")]
