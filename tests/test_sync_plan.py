"""The shared-state election (pccl.sync_plan): rules by example, then invariants under hypothesis."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.enums import SyncStrategy as S
from pccl.sync_plan import KeyVote, Vote, elect


def vote(strategy=S.ENFORCE_POPULAR, revision=1, digests=(b"a", b"b"), names=("k0", "k1"), shape=(4,),
         unequal=()):
    return Vote(strategy, revision, tuple(
        KeyVote(n, "float32", shape, 16, d, n in unequal) for n, d in zip(names, digests)))


def test_popular_content_wins_and_only_differing_keys_move():
    plan = elect({1: vote(digests=(b"a", b"b")), 2: vote(digests=(b"a", b"b")), 3: vote(digests=(b"a", b"X"))})
    assert plan.revision == 1
    assert plan.outcomes[1].fetch == () and plan.outcomes[2].fetch == ()
    (f,) = plan.outcomes[3].fetch
    assert f.key == 1 and f.holders == (1, 2)
    assert plan.holders() == {1, 2}


def test_joiner_at_any_revision_adopts_the_highest_and_fetches_everything_that_differs():
    plan = elect({1: vote(revision=57), 2: vote(revision=57), 7: vote(revision=0, digests=(b"a", b"z"))})
    assert plan.revision == 57
    assert [f.key for f in plan.outcomes[7].fetch] == [1]
    # a resumed peer with a newer checkpoint wins over two fresh ones
    plan = elect({1: vote(revision=0), 2: vote(revision=0), 3: vote(revision=9, digests=(b"n", b"m"))})
    assert plan.revision == 9
    assert [f.key for f in plan.outcomes[1].fetch] == [0, 1] and plan.outcomes[1].fetch[0].holders == (3,)


def test_tie_is_broken_by_the_smallest_digest():
    plan = elect({1: vote(digests=(b"q", b"b")), 2: vote(digests=(b"p", b"b"))})
    assert plan.outcomes[1].fetch[0].holders == (2,) and plan.outcomes[2].fetch == ()


def test_layout_mismatch_errors_only_that_peer_and_names_the_key():
    plan = elect({1: vote(), 2: vote(), 3: vote(shape=(5,))})
    assert "'k0'" in plan.outcomes[3].error and "[5]" in plan.outcomes[3].error
    assert plan.outcomes[1].error == plan.outcomes[2].error == ""
    plan = elect({1: vote(), 2: vote(), 3: vote(names=("k0", "other"))})
    assert "'k1'" in plan.outcomes[3].error and "missing" in plan.outcomes[3].error


def test_allow_inequality_keys_move_only_to_peers_that_are_behind():
    votes = {1: vote(digests=(b"a", b"x"), unequal=("k1",)), 2: vote(digests=(b"a", b"y"), unequal=("k1",)),
             3: vote(revision=0, digests=(b"a", b"z"), unequal=("k1",))}
    plan = elect(votes)
    assert plan.outcomes[1].fetch == () and plan.outcomes[2].fetch == ()
    (f,) = plan.outcomes[3].fetch
    assert f.key == 1 and f.holders == (1,)  # tie between x and y: smallest digest, one consistent source


def test_send_only_peers_are_the_source_of_truth():
    plan = elect({1: vote(S.SEND_ONLY, digests=(b"s", b"s")), 2: vote(digests=(b"a", b"b")),
                  3: vote(digests=(b"a", b"b"))})
    assert plan.outcomes[1].fetch == ()
    assert plan.outcomes[2].fetch[0].holders == (1,) and len(plan.outcomes[3].fetch) == 2


def test_send_only_peer_that_lost_or_is_behind_gets_an_error():
    plan = elect({1: vote(S.SEND_ONLY, digests=(b"a", b"b")), 2: vote(S.SEND_ONLY, digests=(b"a", b"b")),
                  3: vote(S.SEND_ONLY, digests=(b"a", b"c")), 4: vote(S.SEND_ONLY, revision=0)})
    assert "differs" in plan.outcomes[3].error and "'k1'" in plan.outcomes[3].error
    assert "behind" in plan.outcomes[4].error
    assert plan.outcomes[1].error == "" and plan.outcomes[2].error == ""


def test_disagreeing_send_only_peers_leave_receivers_with_a_clear_error():
    plan = elect({1: vote(S.SEND_ONLY, digests=(b"a", b"y")), 2: vote(S.SEND_ONLY, digests=(b"b", b"x")),
                  3: vote(S.RECEIVE_ONLY, digests=(b"z", b"z"))})
    assert "never receives" in plan.outcomes[1].error and "never receives" in plan.outcomes[2].error
    assert "SEND_ONLY peers disagree" in plan.outcomes[3].error


def test_receive_only_peers_never_vote_and_all_receive_only_is_an_error():
    plan = elect({1: vote(digests=(b"a", b"b")), 2: vote(S.RECEIVE_ONLY, digests=(b"z", b"z")),
                  3: vote(S.RECEIVE_ONLY, digests=(b"z", b"z"))})
    assert plan.outcomes[1].fetch == () and len(plan.outcomes[2].fetch) == 2
    plan = elect({1: vote(S.RECEIVE_ONLY), 2: vote(S.RECEIVE_ONLY)})
    assert all("RECEIVE_ONLY" in o.error for o in plan.outcomes.values())


def test_receive_only_peer_holding_the_winner_serves_and_receives_nothing():
    plan = elect({1: vote(digests=(b"a", b"b")), 2: vote(S.RECEIVE_ONLY, digests=(b"a", b"b")),
                  3: vote(revision=0, digests=(b"0", b"0"))})
    assert plan.outcomes[2].fetch == ()
    assert plan.outcomes[3].fetch[0].holders == (1, 2)


# ----------------------------------------------------------------------------------- invariants
DIGESTS = st.sampled_from([b"a", b"b", b"c"])


@st.composite
def elections(draw):
    n = draw(st.integers(1, 7))
    nkeys = 3
    unequal = draw(st.sets(st.sampled_from(["k0", "k1", "k2"]), max_size=1))
    votes = {}
    for pid in draw(st.lists(st.integers(1, 50), min_size=n, max_size=n, unique=True)):
        strategy = draw(st.sampled_from([S.ENFORCE_POPULAR] * 3 + [S.SEND_ONLY, S.RECEIVE_ONLY]))
        revision = draw(st.sampled_from([0, 5, 5, 6]))
        shape = draw(st.sampled_from([(4,)] * 5 + [(3,)]))
        votes[pid] = vote(strategy, revision, tuple(draw(DIGESTS) for _ in range(nkeys)),
                          names=("k0", "k1", "k2"), shape=shape, unequal=unequal)
    return votes


@settings(max_examples=400, deadline=None)
@given(elections())
def test_election_invariants(votes):
    plan = elect(votes)
    assert set(plan.outcomes) == set(votes)
    ok = {p for p, o in plan.outcomes.items() if not o.error}
    # after the transfers every ok peer holds the same digest of every strictly-shared key
    final = {}
    for p in ok:
        d = [k.digest for k in votes[p].keys]
        for f in plan.outcomes[p].fetch:
            assert f.holders, "a fetch always has a holder"
            for h in f.holders:
                assert h in ok and h != p and votes[h].revision == plan.revision
                assert not any(g.key == f.key for g in plan.outcomes[h].fetch), "holders do not fetch that key"
            src = {votes[h].keys[f.key].digest for h in f.holders}
            assert len(src) == 1, "all holders of a key hold the same content"
            d[f.key] = src.pop()
        final[p] = d
        if votes[p].strategy is S.SEND_ONLY:
            assert plan.outcomes[p].fetch == ()
    strict = [i for i, k in enumerate(next(iter(votes.values())).keys) if not k.allow_inequality]
    for i in strict:
        assert len({final[p][i] for p in ok}) <= 1
    # peers behind the adopted revision end with the elected content of every key
    behind = [p for p in ok if votes[p].revision != plan.revision]
    for i in range(3):
        assert len({final[p][i] for p in behind} | ({final[q][i] for q in ok} if i in strict else set())) <= 1
    # an ENFORCE_POPULAR peer with the reference layout never errors unless SEND_ONLY peers disagree
    for p, o in plan.outcomes.items():
        if o.error and votes[p].strategy is S.ENFORCE_POPULAR and "layout" not in o.error:
            assert ("missing" in o.error or "group" in o.error or "disagree" in o.error or "RECEIVE_ONLY"
                    in o.error)
    # the outcome does not depend on the order of the votes
    assert elect(dict(reversed(list(votes.items())))) == plan
    # a strict majority among the candidates at the adopted revision wins (same layouts everywhere)
    if len({tuple(k.layout() for k in v.keys) for v in votes.values()}) == 1:
        want = S.SEND_ONLY if any(v.strategy is S.SEND_ONLY for v in votes.values()) else S.ENFORCE_POPULAR
        cands = [p for p, v in votes.items() if v.strategy is want and v.revision == plan.revision]
        for i in strict:
            for d in {votes[p].keys[i].digest for p in cands}:
                if sum(votes[p].keys[i].digest == d for p in cands) * 2 > len(cands):
                    assert all(final[p][i] == d for p in ok)
