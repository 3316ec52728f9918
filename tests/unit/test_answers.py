"""Every operator message gets an answer, and only its own: the decode and refusal path of
the aggregator, without a broker (the service is not connected, so what it would publish
is what it owes: ``_owed``). The same paths over real Mosquitto: tests/integration/
test_answers.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from aggregator.answers import SNIFF_BYTES, Budget, read_request_id
from aggregator.service import MAX_PAYLOAD_BYTES, AggregatorService
from aggregator.store import MemoryStore
from broker.link import Outgoing
from broker.models import DispatchRejection, DispatchResult
from broker.replies import correlation_of, request_properties
from broker.settings import Settings
from core.clock import ManualClock

T0 = 1_795_716_000.0
P = "ans"
REQUESTS = f"{P}/dispatch/requests"
REJECTED = f"{P}/dispatch/rejected"


def service(refusals_per_s: float = 1000.0, clock: ManualClock | None = None) -> AggregatorService:
    settings = Settings(topic_prefix=P, log_level="warning")
    return AggregatorService(
        settings=settings,
        clock=clock or ManualClock(T0),
        store=MemoryStore(),
        refusals_per_s=refusals_per_s,
    )


async def owed_after_step(svc: AggregatorService) -> list[Outgoing]:
    """What the step would publish as answers (the link is down: it is all owed)."""
    svc._owed.clear()
    await svc.step()
    return list(svc._owed)


def on(msgs: list[Outgoing], topic: str) -> Iterator[dict[str, object]]:
    return (json.loads(m.payload) for m in msgs if m.topic == topic)


def good(rid: str, **terms: object) -> bytes:
    return json.dumps({"request_id": rid, "power_kw": -5.0, "duration_s": 900.0, **terms}).encode()


# -- reading a request id -----------------------------------------------------------------
def test_a_request_id_is_read_from_the_json_or_a_bounded_scan_of_a_broken_payload() -> None:
    assert read_request_id(b'{"request_id": "r-1", "power_kw": "x"}', parse=True) == "r-1"
    assert read_request_id(b'{"power_kw": 1, "request_id":"r-2", ', parse=True) == "r-2"
    huge = b'{"request_id": "big-1", "pad": "' + b"x" * 100_000 + b'"}'
    assert read_request_id(huge, parse=False) == "big-1"
    late = b'{"pad": "' + b"x" * SNIFF_BYTES + b'", "request_id": "late"}'
    assert read_request_id(late, parse=False) is None  # past the scanned head
    assert read_request_id(b'{"request_id": "a/b#"}', parse=True) is None  # not an id
    assert read_request_id(b'{"request_id": 5}', parse=True) is None
    assert read_request_id(b"[1, 2]", parse=True) is None


def test_the_refusal_budget_answers_a_burst_then_its_rate() -> None:
    b = Budget(per_s=10.0)
    assert sum(b.take(100.0) for _ in range(50)) == 10
    assert sum(b.take(100.5) for _ in range(50)) == 5  # half a second refills five
    assert b.denied == 85


# -- malformed requests ---------------------------------------------------------------------
# Each kind seen to get no answer at all (issue 12): (payload, what the reason says).
MALFORMED = [
    pytest.param(b'{"request_id": "m-1", "power_kw": -5.0}', "duration_s", id="missing-field"),
    pytest.param(good("m-2", duration_s=-900.0), "greater than 0", id="negative-duration"),
    pytest.param(good("m-3", power_kw="-5"), "power_kw", id="power-as-string"),
    pytest.param(good("m-4", service="peak_shavng"), "service", id="unknown-service"),
    pytest.param(b'{"request_id": "m-5", "power_kw": -5,', "json", id="invalid-json"),
    pytest.param(
        good("m-6", strat="2026-12-03T10:00:00Z"), "'strat' (did you mean 'start'?)", id="strat"
    ),
]


@pytest.mark.parametrize(("payload", "why"), MALFORMED)
async def test_a_malformed_request_with_a_readable_id_is_rejected_on_its_result_topic(
    payload: bytes, why: str
) -> None:
    svc = service()
    svc.on_payload(REQUESTS, payload)
    assert sum(svc.rejected.values()) == 1  # counted as before
    rid = read_request_id(payload, parse=False)
    assert rid is not None and rid.startswith("m-")
    msgs = await owed_after_step(svc)
    assert [m.topic for m in msgs] == [f"{P}/dispatch/{rid}/result"]
    answer = DispatchResult.model_validate_json(msgs[0].payload)
    assert answer.status == "rejected" and answer.answer_to == "request"
    assert answer.reason is not None and answer.reason.startswith("invalid request")
    assert why in answer.reason
    assert not svc.dispatcher.dispatches


async def test_an_oversize_request_is_answered_on_its_result_topic_without_a_parse() -> None:
    svc = service()
    payload = good("big-7", pad="x" * MAX_PAYLOAD_BYTES)
    svc.on_payload(REQUESTS, payload)
    assert svc.rejected["size"] == 1
    msgs = await owed_after_step(svc)
    (answer,) = on(msgs, f"{P}/dispatch/big-7/result")
    assert answer["status"] == "rejected" and "limit" in str(answer["reason"])


@pytest.mark.parametrize(
    "payload",
    [b"not json at all", b'{"power_kw": -5, "duration_s": 900}', b"\xff" * 70_000],
    ids=["garbage", "no-request-id", "oversize-garbage"],
)
async def test_a_request_whose_id_cannot_be_read_is_answered_on_dispatch_rejected(
    payload: bytes,
) -> None:
    svc = service()
    svc.on_payload(REQUESTS, payload)
    msgs = await owed_after_step(svc)
    assert [m.topic for m in msgs] == [REJECTED]
    assert msgs[0].qos == 1 and not msgs[0].retain
    assert "request_id" not in json.loads(msgs[0].payload)  # not known: not there
    notice = DispatchRejection.model_validate_json(msgs[0].payload)
    assert notice.reason.startswith("invalid request")
    assert notice.topic == REQUESTS
    assert 0 < len(notice.payload_head) <= 200


async def test_a_flood_of_garbage_is_counted_but_answered_only_at_the_budget() -> None:
    svc = service(refusals_per_s=5.0)
    for _ in range(1000):
        svc.on_payload(REQUESTS, b"{")
    assert svc.rejected["json"] == 1000
    msgs = await owed_after_step(svc)
    assert 5 <= len(msgs) <= 6
    assert svc.refusals_unanswered >= 994


# -- operator messages refuse unknown fields ----------------------------------------------
@pytest.mark.parametrize(
    ("topic", "payload", "named"),
    [
        (f"{P}/dispatch/r-9/amend", b'{"power_kw": -3, "duraton_s": 60}', "'duraton_s'"),
        (f"{P}/dispatch/r-9/cancel", b'{"now": true}', "'now'"),
    ],
    ids=["amend", "cancel"],
)
async def test_an_amend_or_cancel_with_an_unknown_field_is_refused_with_the_field_named(
    topic: str, payload: bytes, named: str
) -> None:
    svc = service()
    svc.on_payload(topic, payload)
    assert svc.rejected["unknown_field"] == 1
    msgs = await owed_after_step(svc)
    (answer,) = on(msgs, f"{P}/dispatch/r-9/result")
    assert answer["status"] == "rejected" and named in str(answer["reason"])
    assert answer["answer_to"] == topic.rsplit("/", 1)[1]


def test_a_signal_with_an_unknown_field_is_refused_with_the_field_named() -> None:
    svc = service()
    svc.on_payload(f"{P}/dispatch/r-9/signal", b'{"ts": "2026-12-03T10:00:00Z", "valu": 0.5}')
    assert svc.rejected["unknown_field"] == 1
    assert not svc._signals


# -- cancel and amend of nothing -----------------------------------------------------------
async def test_cancel_and_amend_of_an_unknown_request_are_rejected_unknown_request() -> None:
    svc = service()
    svc.on_payload(f"{P}/dispatch/ghost/cancel", b"{}")
    svc.on_payload(f"{P}/dispatch/ghost/amend", b'{"power_kw": -3}')
    msgs = await owed_after_step(svc)
    answers = list(on(msgs, f"{P}/dispatch/ghost/result"))
    assert [(a["status"], a["answer_to"], a["reason"]) for a in answers] == [
        ("rejected", "cancel", "unknown request"),
        ("rejected", "amend", "unknown request"),
    ]


# -- answers to the sender: MQTT 5 response topic ------------------------------------------
async def test_every_answer_also_goes_to_the_response_topic_with_its_correlation_data() -> None:
    clock = ManualClock(T0)
    svc = service(clock=clock)
    reply = f"{P}/operators/me/responses"
    svc.on_payload(REQUESTS, good("rt-1", duration_s=10.0), request_properties(reply, b"c-1"))
    first = await owed_after_step(svc)
    to_me = [m for m in first if m.topic == reply]
    assert len(to_me) == 1 and correlation_of(to_me[0].properties) == b"c-1"
    assert to_me[0].payload == next(
        m.payload for m in first if m.topic == f"{P}/dispatch/rt-1/result"
    )
    clock.advance(10.0)
    done = await owed_after_step(svc)
    (final,) = (DispatchResult.model_validate_json(m.payload) for m in done if m.topic == reply)
    assert final.status == "completed"
    # A malformed one: the refusal goes there too.
    svc.on_payload(REQUESTS, b'{"request_id": "rt-2"}', request_properties(reply, b"c-2"))
    refused = [m for m in await owed_after_step(svc) if m.topic == reply]
    assert len(refused) == 1 and correlation_of(refused[0].properties) == b"c-2"


@pytest.mark.parametrize(
    "reply", ["a/+/b", "#", "$SYS/x", f"{P}/vehicles/ev-1/setpoint", "x" * 300]
)
async def test_a_response_topic_the_aggregator_may_not_answer_on_refuses_the_message(
    reply: str,
) -> None:
    svc = service()
    svc.on_payload(REQUESTS, good("bad-reply"), request_properties(reply, b"c"))
    assert svc.rejected["reply"] == 1
    msgs = await owed_after_step(svc)
    assert {m.topic for m in msgs} == {f"{P}/dispatch/bad-reply/result"}
    assert "response topic" in str(next(on(msgs, f"{P}/dispatch/bad-reply/result"))["reason"])
    assert not svc.dispatcher.dispatches


# -- a reused id --------------------------------------------------------------------------
async def test_a_request_reusing_a_running_id_on_other_terms_is_answered_to_its_sender_only() -> (
    None
):
    svc = service()
    svc.on_payload(REQUESTS, good("dup-1"))
    await owed_after_step(svc)
    assert "dup-1" in svc.dispatcher.dispatches
    result_topic = f"{P}/dispatch/dup-1/result"
    # Without a response topic: on dispatch/rejected.
    svc.on_payload(REQUESTS, good("dup-1", power_kw=-7.0))
    msgs = await owed_after_step(svc)
    assert not list(on(msgs, result_topic))
    (notice,) = on(msgs, REJECTED)
    assert notice["request_id"] == "dup-1" and "different terms" in str(notice["reason"])
    # With one: there only.
    mine = f"{P}/operators/other/responses"
    svc.on_payload(REQUESTS, good("dup-1", power_kw=-9.0), request_properties(mine, b"k"))
    msgs = await owed_after_step(svc)
    assert [m.topic for m in msgs] == [mine]
    assert DispatchResult.model_validate_json(msgs[0].payload).status == "rejected"
    # A malformed one with the running id: the same.
    svc.on_payload(REQUESTS, good("dup-1", duration_s="x"))
    msgs = await owed_after_step(svc)
    assert [m.topic for m in msgs] == [REJECTED]
    # The request runs on; an identical re-send gets its answer again, as before.
    assert svc.dispatcher.dispatches["dup-1"].request.power_kw == -5.0
    svc.on_payload(REQUESTS, good("dup-1"))
    msgs = await owed_after_step(svc)
    (again,) = on(msgs, result_topic)
    assert again["status"] in ("accepted", "partial")


async def test_a_refused_amendment_goes_to_its_sender_not_to_the_requests_response_topic() -> None:
    svc = service()
    requester, other = f"{P}/operators/a/responses", f"{P}/operators/b/responses"
    svc.on_payload(REQUESTS, good("am-1"), request_properties(requester, b"a"))
    await owed_after_step(svc)
    amend = f"{P}/dispatch/am-1/amend"
    svc.on_payload(amend, b'{"power_kw": "x"}', request_properties(other, b"b"))
    svc.on_payload(amend, b'{"duration_s": 1}', request_properties(other, b"b2"))
    msgs = await owed_after_step(svc)
    assert requester not in {m.topic for m in msgs}
    to_other = [DispatchResult.model_validate_json(m.payload) for m in msgs if m.topic == other]
    assert [(a.status, a.answer_to) for a in to_other] == [("rejected", "amend")] * 2
    # An amendment that takes effect is news for the requester too.
    svc.on_payload(amend, b'{"power_kw": -3}', request_properties(other, b"b3"))
    msgs = await owed_after_step(svc)
    assert {m.topic for m in msgs} >= {requester, other, f"{P}/dispatch/am-1/result"}


def test_a_follower_ends_only_on_a_final_answer_to_the_request_itself() -> None:
    from datetime import UTC, datetime

    from v2g.operator import answer_of, is_final

    at = datetime(2026, 12, 3, tzinfo=UTC)

    def r(status: str, to: str) -> DispatchResult:
        return DispatchResult.model_validate(
            {"request_id": "r", "status": status, "answer_to": to, "ts": at}
        )

    assert is_final(r("rejected", "request")) and is_final(r("completed", "request"))
    assert is_final(r("cancelled", "cancel"))
    assert not is_final(r("rejected", "amend")) and not is_final(r("rejected", "cancel"))
    assert not is_final(r("partial", "amend"))
    notice = DispatchRejection(ts=at, reason="why", topic="t", payload_head="{")
    read = answer_of(notice.to_json(), "mine")
    assert (read.request_id, read.status, read.reason) == ("mine", "rejected", "why")
