"""Device events on the agent: the bounded queue and the log handler that feeds it."""

from __future__ import annotations

import logging

from fedge.agent.events import EventHandler, EventLog
from fedge.wire import EventBatch


def test_the_queue_is_bounded_and_says_how_many_it_dropped() -> None:
    log = EventLog(capacity=3, clock=lambda: 100.0)
    for i in range(5):
        log.add("warning", f"w{i}", level="warning")
    assert len(log) == 3 and log.dropped == 2
    batch = log.take(10)
    assert batch[0]["kind"] == "dropped" and batch[0]["fields"] == {"count": 2}
    assert [e["message"] for e in batch[1:]] == ["w2", "w3", "w4"]
    EventBatch.model_validate({"events": batch})  # what the agent sends is valid on the wire


def test_an_unsent_batch_goes_back_to_the_front() -> None:
    log = EventLog(capacity=10)
    for i in range(4):
        log.add("policy", f"p{i}")
    batch = log.take(2)
    log.add("policy", "p4")
    log.put_back(batch)
    assert [e["message"] for e in log.take(10)] == ["p0", "p1", "p2", "p3", "p4"]


def test_long_messages_and_empty_ones_stay_valid() -> None:
    log = EventLog()
    log.add("error", "x" * 2000, level="error")
    log.add("warning", "", level="warning")
    batch = log.take()
    assert len(batch[0]["message"]) == 500 and batch[1]["message"] == "(no message)"
    EventBatch.model_validate({"events": batch})


def _logger(log: EventLog) -> logging.Logger:
    logger = logging.getLogger("fedge.agent.test_events")
    logger.handlers[:] = [EventHandler(log)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def test_the_handler_keeps_tagged_records_warnings_and_errors_only() -> None:
    log = EventLog()
    logger = _logger(log)
    logger.debug("noise")
    logger.info("routine")
    logger.info("enrolled as device d1", extra={"event": "enrolment"})
    logger.warning("coordinator unreachable")
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        logger.exception("checkpoint failed")
    events = log.take()
    assert [(e["kind"], e["level"]) for e in events] == [
        ("enrolment", "info"), ("warning", "warning"), ("error", "error")]
    error = events[-1]["fields"]
    assert error["exception"] == "RuntimeError: disk full" and "test_the_handler" in error["where"]
    EventBatch.model_validate({"events": events})


def test_a_bad_record_never_raises_into_the_caller() -> None:
    log = EventLog()
    logger = _logger(log)
    logger.warning("%d things", "not a number")  # a broken format: logging's own error path, no raise
    assert len(log) == 0
