"""Subjects built from event types, validated, and mapped to MQTT topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedbus.bus import Catalogue, Event, event, subjects
from fedbus.bus.errors import SubjectError

CAT = Catalogue()


@event("jobs", "offer", key="job_id", catalogue=CAT)
class Offer(Event):
    job_id: str


@event("telemetry", "system", catalogue=CAT)
class System(Event):
    cpu: float


def test_subject_from_event_type_and_key() -> None:
    assert Offer(job_id="J1").subject() == "fedbus.jobs.offer.J1"
    assert System(cpu=0.5).subject() == "fedbus.telemetry.system"
    assert Offer.pattern() == "fedbus.jobs.offer.*"
    assert Offer.pattern("J1") == "fedbus.jobs.offer.J1"
    assert System.pattern() == "fedbus.telemetry.system"


@pytest.mark.parametrize("bad", ["a b", "a.b", "x*", ">", "", "a\r\nPUB", "a/b", "+", "#"])
def test_unsafe_keys_are_refused(bad: str) -> None:
    with pytest.raises(SubjectError):
        Offer(job_id=bad).subject()


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a\tb", "a.b\n"])
def test_publish_subjects_reject_wildcards_and_whitespace(bad: str) -> None:
    with pytest.raises(SubjectError):
        subjects.validate_subject(bad)


def test_patterns() -> None:
    assert subjects.validate_pattern("fedbus.*.offer.>") == "fedbus.*.offer.>"
    with pytest.raises(SubjectError, match="last"):
        subjects.validate_pattern("fedbus.>.x")
    assert subjects.matches("fedbus.jobs.*", "fedbus.jobs.offer")
    assert not subjects.matches("fedbus.jobs.*", "fedbus.jobs.offer.J1")
    assert subjects.matches("fedbus.>", "fedbus.jobs.offer.J1")
    assert not subjects.matches("fedbus.>", "fedbus")
    assert not subjects.matches("fedbus.jobs", "fedbus.jobs.offer")


def test_mqtt_topics_mirror_subjects() -> None:
    assert subjects.to_mqtt("fedbus.jobs.offer.J1") == "fedbus/jobs/offer/J1"
    assert subjects.to_mqtt("fedbus.*.offer.>") == "fedbus/+/offer/#"
    assert subjects.from_mqtt("fedbus/+/offer/#") == "fedbus.*.offer.>"
    with pytest.raises(SubjectError):
        subjects.from_mqtt("fedbus/a.b")


def test_event_declaration_errors() -> None:
    with pytest.raises(SubjectError):
        event("bad domain", "x")
    with pytest.raises(SubjectError):
        @event("jobs", "thing", key="missing", catalogue=Catalogue())
        class Thing(Event):
            job_id: str


_token = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


@given(st.lists(_token, min_size=1, max_size=6))
def test_mqtt_round_trip(tokens: list[str]) -> None:
    subject = ".".join(tokens)
    assert subjects.from_mqtt(subjects.to_mqtt(subject)) == subject
    assert subjects.matches(subject, subject)
