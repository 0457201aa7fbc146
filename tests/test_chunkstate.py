"""The runner's chunk state machine on its own: no Dask, no files, just events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcbatch.chunkstate import ChunkStates, Policy, make_chunks
from hpcbatch.errors import ChunkFailedError, ConfigError

OUTCOMES = ("ok", "memory", "error", "cancelled", "victim")


def _error() -> tuple:
    try:
        raise ValueError("bad row")
    except ValueError as exc:
        return type(exc), exc, exc.__traceback__


def _drive(states: ChunkStates, outcomes, window: int) -> list[int]:
    """Feed ``outcomes`` (cycled) to whatever is in flight; the items each success did."""
    done: list[int] = []
    step = 0
    while not states.finished and states.fatal is None:
        in_flight = states.take(window) or list(states.in_flight)
        assert in_flight, "nothing in flight and nothing to take, yet not finished"
        for attempt in in_flight:
            outcome = outcomes[step % len(outcomes)]
            step += 1
            if outcome == "ok" or step > 10_000:
                states.succeeded(attempt, {"items": attempt.chunk.size})
                done.extend(range(attempt.chunk.start, attempt.chunk.stop))
            elif outcome == "memory":
                states.memory_failure(attempt, "MemoryError: test")
            elif outcome == "error":
                states.error(attempt, *_error())
            elif outcome == "cancelled":
                states.cancelled(attempt)
            else:
                states.requeue(attempt)
    return done


@settings(max_examples=300, deadline=None)
@given(
    n_items=st.integers(1, 40),
    chunk_size=st.integers(1, 16),
    retries=st.integers(0, 3),
    min_chunk=st.integers(1, 4),
    window=st.integers(1, 6),
    outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=30),
)
def test_every_item_done_exactly_once_or_the_run_failed_with_a_reason(
    n_items, chunk_size, retries, min_chunk, window, outcomes
):
    states = ChunkStates(make_chunks(n_items, chunk_size), Policy(retries, min_chunk))
    done = _drive(states, outcomes, window)
    assert len(done) == len(set(done)), "an item was done twice"
    c = states.counters
    assert c.items_done == len(done) and c.meta.get("items", 0) == len(done)
    assert c.max_in_flight <= window
    if states.fatal is None:
        assert sorted(done) == list(range(n_items)), "an item was lost"
        assert c.chunks_done == len(make_chunks(n_items, chunk_size))
        assert c.failed == 0 and not states.failures
    else:
        assert isinstance(states.fatal, ChunkFailedError)
        assert states.fatal.chunk_id and states.fatal.chunk_id.split(".")[0].startswith("c")
        assert c.failed >= 1 and str(states.fatal).strip()
    # nothing is ever in flight, queued or held twice
    alive = [a.chunk for a in states.queue] + [a.chunk for a in states.in_flight]
    covered = [i for ch in alive for i in range(ch.start, ch.stop)]
    assert len(covered) == len(set(covered)) and not set(covered) & set(done)


def test_memory_failures_halve_down_to_min_chunk_then_name_what_it_needed():
    states = ChunkStates(make_chunks(8, 8), Policy(retries=2, min_chunk=2))
    (a,) = states.take(10)
    verdict = states.memory_failure(a, "its worker was killed for memory at 1.2 GiB")
    assert verdict.action == "split"
    assert "chunk c000000 (8 items 0..7) ran out of memory" in verdict.message
    assert "split into 4 + 4 items" in verdict.message
    first, second = states.take(10)
    assert (first.chunk.chunk_id, second.chunk.chunk_id) == ("c000000.0", "c000000.1")
    states.succeeded(second, {})
    states.memory_failure(first, "MemoryError")  # 4 -> 2 + 2
    quarter, _ = states.take(10)
    assert quarter.chunk.size == 2
    assert states.memory_failure(quarter, "x", needed=3 * 2**30).action == "failed"
    assert "minimum chunk size (2)" in str(states.fatal) and "3.00 GiB" in str(states.fatal)
    assert states.fatal.chunk_id == "c000000.0.0"
    assert states.counters.split == 2 and states.take(10) == []  # a failed run submits nothing


def test_errors_are_retried_then_fail_with_the_traceback_and_the_resume_hint():
    states = ChunkStates(make_chunks(2, 2), Policy(retries=1, resume_hint="rerun it"))
    (a,) = states.take(1)
    v = states.error(a, *_error())
    assert v.action == "retry" and "retry 1 of 1" in v.message
    (b,) = states.take(1)
    assert b.number == 1 and b.label == 1
    v = states.error(b, *_error())
    assert v.action == "failed" and "failed 2 times" in v.message and "bad row" in v.message
    assert "after 2 attempts: ValueError: bad row" in str(states.fatal)
    assert str(states.fatal).endswith("then rerun it (finished chunks are kept)")
    assert "raise ValueError" in states.fatal.traceback
    assert states.failures[0]["chunk_id"] == "c000000"


def test_requeued_and_held_attempts_keep_their_retries_and_get_a_new_label():
    states = ChunkStates(make_chunks(4, 2))
    a, b = states.take(2)
    assert states.requeue(a).action == "requeued"
    states.hold(b)
    assert not states.finished and states.take(5)[0].label == "0.1"  # a, again
    assert states.release() == 1
    (b2,) = states.take(5)
    assert (b2.chunk, b2.number, b2.label) == (b.chunk, 0, "0.1")
    c = states.counters
    assert (c.retried, c.split, c.requeued) == (0, 0, 1)


def test_a_piece_of_a_resumed_chunk_completes_its_root_chunk():
    first, second = make_chunks(4, 4)[0].split()
    states = ChunkStates([second])  # the first half was recorded done before
    (a,) = states.take(1)
    states.succeeded(a, {"n": 2, "flag": True})
    assert states.finished and states.counters.chunks_done == 1
    assert states.counters.meta == {"n": 2}  # booleans are not summed


def test_events_for_attempts_not_in_flight_are_refused():
    states = ChunkStates(make_chunks(2, 1))
    (a,) = states.take(1)
    states.succeeded(a, {})
    with pytest.raises(ValueError, match="not in flight"):
        states.succeeded(a, {})
    with pytest.raises(ConfigError, match="retries"):
        Policy(retries=-1)


def test_a_run_level_failure_is_recorded_once_and_stops_submission():
    states = ChunkStates(make_chunks(3, 1))
    states.take(1)
    error = states.fail_run(ChunkFailedError("the cluster lost all its workers"))
    assert states.fatal is error and states.take(3) == []
    assert states.failures == [
        {"chunk_id": None, "error": "the cluster lost all its workers", "traceback": ""}
    ]
