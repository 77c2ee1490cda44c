"""The control channel's session machine (``pccl.transports.reconnect``): pure, time as an input."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.transports import reconnect as rc
from pccl.transports.reconnect import Attempt, Drop, Fail, Lost, Phase

BASE, CAP, WINDOW, SILENCE = 0.1, 2.0, 30.0, 6.0


def session(now: float = 0.0, window: float = WINDOW, first_window: float = SILENCE) -> rc.Session:
    return rc.Session(now, window=window, base=BASE, cap=CAP, attempt_timeout=SILENCE, silence=SILENCE,
                      first_window=first_window)


def connected(now: float = 0.0, window: float = WINDOW) -> rc.Session:
    s = session(now, window)
    assert s.registered(now) == []
    assert s.phase is Phase.CONNECTED
    return s


def run_until(s: rc.Session, end: float) -> list[tuple[float, object]]:
    """Tick at every deadline the machine asks for (attempts fail at once: the port refuses)."""
    log = []
    while s.phase not in rc.FINAL:
        t = s.next_deadline()
        if t > end:
            break
        for a in s.tick(t):
            log.append((t, a))
            if isinstance(a, Attempt):
                for b in s.connection_lost(t, "refused"):
                    log.append((t, b))
    return log


def test_backoff_doubles_and_is_capped():
    assert [rc.backoff(k, 0.1, 2.0) for k in range(8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    assert rc.backoff(10_000, 0.1, 2.0) == 2.0


def test_first_registration_succeeds():
    s = session()
    assert s.phase is Phase.REGISTERING
    assert s.next_deadline() == SILENCE
    assert s.registered(0.3) == []
    assert s.phase is Phase.CONNECTED and s.sessions == 1
    assert s.next_deadline() == pytest.approx(0.3 + SILENCE)


def test_silence_while_connected_is_a_loss_and_any_message_defers_it():
    s = connected()
    s.heard(5.0)
    assert s.tick(10.9) == []
    acts = s.tick(11.1)
    assert acts[0] == Drop() and isinstance(acts[1], Lost) and "no message from the master" in acts[1].reason
    assert acts[1].window == WINDOW
    assert s.phase is Phase.BACKING_OFF
    assert s.next_deadline() == pytest.approx(11.1 + BASE)


def test_a_frozen_process_does_not_count_its_freeze_as_master_silence():
    s = connected()
    s.heard(5.0)
    s.stalled(20.0, 12.0)  # SIGSTOPped from 8.0 to 20.0: the master was silent 3 s of running time
    assert s.tick(20.0) == [] and s.phase is Phase.CONNECTED
    assert s.next_deadline() == pytest.approx(5.0 + 12.0 + SILENCE)
    assert s.kicked(20.01, "missed heartbeats") == [Fail("kicked", "missed heartbeats")]  # read after the freeze
    s = connected()
    s.stalled(3.0, 100.0)  # never beyond now: a stall cannot buy silence in the future
    assert s.next_deadline() == pytest.approx(3.0 + SILENCE)
    acts = s.tick(9.1)
    assert isinstance(acts[1], Lost)  # real silence after the freeze still is a loss
    s.stalled(9.2, 5.0)  # only a connected session's silence clock is affected
    assert s.phase is Phase.BACKING_OFF and s.next_deadline() == pytest.approx(9.1 + BASE)


def test_closed_connection_is_a_loss_then_attempts_back_off_with_a_cap_until_the_window_ends():
    s = connected()
    assert s.connection_lost(1.0, "the connection closed") == [Drop(), Lost("the connection closed", WINDOW)]
    log = run_until(s, 1000.0)
    starts = [t for t, a in log if isinstance(a, Attempt)]
    gaps = [b - a for a, b in zip([1.0] + starts, starts)]
    assert gaps[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    assert all(g == pytest.approx(CAP) for g in gaps[5:])
    assert starts[-1] < 1.0 + WINDOW
    t_fail, fail = log[-1]
    assert isinstance(fail, Fail) and fail.kind == "unreachable"
    assert t_fail == pytest.approx(1.0 + WINDOW)
    assert "the connection closed" in fail.reason and "reconnection" in fail.reason
    assert s.phase is Phase.GIVEN_UP
    assert s.tick(1e9) == [] and s.registered(1e9) == [] and s.connection_lost(1e9, "x") == []


def test_reconnect_then_a_second_loss_opens_a_fresh_window():
    s = connected()
    s.connection_lost(10.0, "closed")
    assert s.tick(10.1) == [Attempt(1)]
    assert s.phase is Phase.REGISTERING
    assert s.registered(10.2) == []
    assert s.phase is Phase.CONNECTED and s.sessions == 2
    acts = s.connection_lost(50.0, "closed again")
    assert isinstance(acts[1], Lost)
    assert s.window_end == pytest.approx(50.0 + WINDOW)
    assert s.tick(50.1) == [Attempt(1)]  # the backoff starts over


def test_unanswered_attempt_times_out_and_backs_off():
    s = connected()
    s.connection_lost(0.0, "closed")
    assert s.tick(BASE) == [Attempt(1)]
    assert s.next_deadline() == pytest.approx(BASE + SILENCE)
    assert s.tick(BASE + SILENCE) == [Drop()]
    assert s.phase is Phase.BACKING_OFF
    assert s.next_deadline() == pytest.approx(BASE + SILENCE + 0.2)


def test_an_attempt_in_flight_is_abandoned_when_the_window_ends():
    s = session(window=1.0)
    s.registered(0.0)
    s.connection_lost(0.0, "closed")
    assert s.tick(0.1) == [Attempt(1)]
    assert s.next_deadline() == pytest.approx(1.0)  # the window, before the attempt's own timeout
    acts = s.tick(1.0)
    assert acts[0] == Drop() and isinstance(acts[1], Fail) and acts[1].kind == "unreachable"


def test_window_zero_gives_up_at_the_first_loss():
    s = connected(window=0.0)
    acts = s.connection_lost(3.0, "the connection closed")
    assert acts == [Drop(), Fail("unreachable", "the connection closed")]
    assert s.phase is Phase.GIVEN_UP
    s = connected(window=0.0)
    acts = s.tick(SILENCE + 0.5)
    assert acts[0] == Drop() and isinstance(acts[1], Fail) and acts[1].kind == "unreachable"


def test_first_registration_retries_refusals_within_master_timeout_only():
    s = session()
    log = [(0.0, a) for a in s.connection_lost(0.0, "refused")]
    log += run_until(s, 100.0)
    starts = [t for t, a in log if isinstance(a, Attempt)]
    assert starts and starts[-1] < SILENCE
    t_fail, fail = log[-1]
    assert isinstance(fail, Fail) and fail.kind == "unreachable" and "registration" in fail.reason
    assert t_fail == pytest.approx(SILENCE)
    assert not any(isinstance(a, Lost) for _, a in log)  # never connected: nothing to report as lost


def test_first_registration_that_is_never_answered_gives_up_after_master_timeout():
    s = session()
    assert s.tick(SILENCE - 0.01) == []
    acts = s.tick(SILENCE)
    assert acts[0] == Drop() and acts[1].kind == "unreachable"


def test_kicked_while_connected_is_final():
    s = connected()
    assert s.kicked(1.0, "peer 3 missed heartbeats") == [Fail("kicked", "peer 3 missed heartbeats")]
    assert s.phase is Phase.KICKED
    # nothing brings it back
    assert s.connection_lost(2.0, "closed") == []
    assert s.tick(1e6) == [] and s.registered(1e6) == [] and s.kicked(1e6, "again") == []
    assert s.next_deadline() == float("inf")


@pytest.mark.parametrize("first", [True, False])
def test_a_registration_that_is_kicked_is_a_refusal(first):
    s = session()
    if not first:
        s.registered(0.0)
        s.connection_lost(1.0, "closed")
        assert s.tick(1.1) == [Attempt(1)]
    acts = s.kicked(1.2, "protocol error: fields do not match")
    assert acts == [Drop(), Fail("refused", "protocol error: fields do not match")]
    assert s.phase is Phase.KICKED and s.tick(1e6) == []


def test_close_is_final_and_idempotent():
    s = connected()
    assert s.close() == [Drop()]
    assert s.phase is Phase.CLOSED
    assert s.close() == [] and s.tick(1e9) == [] and s.connection_lost(1.0, "x") == []


def test_late_events_from_a_dropped_connection_are_ignored_while_backing_off():
    s = connected()
    s.connection_lost(0.0, "closed")
    assert s.connection_lost(0.01, "closed") == []  # the monitor may report twice
    assert s.registered(0.02) == [] and s.phase is Phase.BACKING_OFF
    assert s.kicked(0.03, "x") == [] and s.phase is Phase.BACKING_OFF


def test_invalid_parameters():
    with pytest.raises(ValueError):
        rc.Session(0.0, window=-1, base=0.1, cap=2, attempt_timeout=1, silence=1, first_window=1)
    with pytest.raises(ValueError):
        rc.Session(0.0, window=1, base=1.0, cap=0.5, attempt_timeout=1, silence=1, first_window=1)


EVENTS = st.lists(st.tuples(st.sampled_from(["tick", "lost", "registered", "heard", "kicked", "stalled"]),
                            st.floats(0.0, 3.0)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.sampled_from([0.0, 5.0, 30.0]))
def test_random_event_sequences_keep_the_invariants(events, window):
    """Whatever happens: every Attempt follows a Drop or a loss, at most one Fail ever, nothing
    after a final phase, no attempt starts after the window ended, and Kicked is final."""
    s = session(window=window)
    now, fails, open_conn = 0.0, 0, True
    for kind, dt in events:
        now += dt
        phase = s.phase
        window_end = s.window_end
        if kind == "tick":
            acts = s.tick(now)
        elif kind == "lost":
            acts = s.connection_lost(now, "closed")
        elif kind == "registered":
            acts = s.registered(now) if open_conn else []
        elif kind in ("heard", "stalled"):
            s.heard(now) if kind == "heard" else s.stalled(now, dt)
            acts = []
            assert s.last_heard <= now
        else:
            acts = s.kicked(now, "bye") if open_conn else []
        if phase in rc.FINAL:
            assert acts == [] and s.phase is phase
        for a in acts:
            if isinstance(a, Drop):
                open_conn = False
            elif isinstance(a, Attempt):
                assert not open_conn and now < window_end
                open_conn = True
            elif isinstance(a, Lost):
                assert window > 0 and phase is Phase.CONNECTED
            elif isinstance(a, Fail):
                fails += 1
                if a.kind == "kicked":
                    assert phase is Phase.CONNECTED
        assert fails <= 1
        assert (fails == 1) == (s.phase in (Phase.GIVEN_UP, Phase.KICKED))
        assert (s.next_deadline() == float("inf")) == (s.phase in rc.FINAL)
