"""The permissions generated from the catalogue (pure), and the role table in docs/security.md."""

from __future__ import annotations

from pathlib import Path

from fedbus.bus.access_doc import project_events
from fedbus.bus.permissions import TABLE_BEGIN, TABLE_END, access_table, grants_for, splice_table
from fedbus.bus.roles import Role

DOC = Path(__file__).parent.parent / "docs" / "security.md"
#: Event types only admin may publish and read, on purpose.
ADMIN_ONLY = {"bus.record"}


def test_security_doc_carries_the_current_table() -> None:
    doc = DOC.read_text()
    assert TABLE_BEGIN in doc and TABLE_END in doc
    expected = splice_table(doc, access_table(project_events()))
    assert doc == expected, "docs/security.md is stale: python -m fedbus.bus.access_doc docs/security.md"


def test_every_event_type_says_who_may_publish_and_read_it() -> None:
    undeclared = [c.spec.type for c in project_events() if not (c.spec.pub or c.spec.sub)]
    assert sorted(set(undeclared) - ADMIN_ONLY) == []


def test_admin_has_no_limits_and_others_have_only_allow_lists() -> None:
    events = list(project_events())
    assert grants_for(Role.ADMIN, "admin", events).publish is None
    for role in Role:
        if role is Role.ADMIN:
            continue
        grants = grants_for(role, "x-1", events)
        assert grants.publish is not None and grants.subscribe is not None
        assert ">" not in grants.publish and "fedbus.>" not in grants.subscribe
        assert "_INBOX.x-1.>" in grants.subscribe
        assert not any(s.startswith("_INBOX.") and not s.startswith("_INBOX.x-1.") for s in grants.subscribe)
        # Nobody but admin creates, updates or deletes streams, or writes the identities.
        assert not any(".STREAM.CREATE." in s or ".STREAM.UPDATE." in s or ".STREAM.DELETE." in s
                       for s in grants.publish), role
        assert not any(s.startswith(("$KV.fedbus-identities", "$KV.agent-keys"))
                       for s in grants.publish), role


def test_a_device_is_scoped_to_its_own_id() -> None:
    grants = grants_for(Role.DEVICE, "phone-7", list(project_events()))
    assert grants.publish is not None and grants.subscribe is not None
    assert "fedbus.edge.status.phone-7" in grants.publish
    assert "fedbus.edge.status.*" not in grants.publish
    assert "fedbus.jobs.offer.phone-7" in grants.subscribe
    assert not any(s.startswith(("fedbus.jobs.submit", "fedbus.jobs.award", "fedbus.jobs.cancel"))
                   for s in grants.publish)
    assert not any(s.startswith("$JS.API.CONSUMER.CREATE.FEDBUS_JOBS") for s in grants.publish)


def test_gpu_agent_cannot_award_or_read_other_agents_work() -> None:
    grants = grants_for(Role.GPU_AGENT, "gpu-1", list(project_events()))
    assert grants.publish is not None and grants.subscribe is not None
    assert not any(s.startswith(("fedbus.jobs.award", "fedbus.jobs.status", "fedbus.jobs.submit"))
                   for s in grants.publish)
    assert "fedbus.jobs.award.gpu-1" in grants.subscribe and "fedbus.jobs.award.*" not in grants.subscribe
    assert not any(s.startswith(("fedbus.jobs.log", "fedbus.jobs.submit")) for s in grants.subscribe)


def test_every_bucket_has_both_limits_and_access() -> None:
    from fedbus.bus.limits import KV_BUCKETS, OBJECT_BUCKETS
    from fedbus.bus.permissions import BUCKETS

    assert {n for n, b in BUCKETS.items() if b.kind == "kv"} == set(KV_BUCKETS)
    assert {n for n, b in BUCKETS.items() if b.kind == "obj"} == set(OBJECT_BUCKETS)


def test_a_credential_never_shows_its_secrets() -> None:
    import os

    from fedbus.bus.creds import Credentials

    creds = Credentials(id="gpu-1", role=Role.GPU_AGENT, user="gpu-1", password="s3cret-pw", signing_seed=os.urandom(32))
    shown = repr(creds) + str(creds)
    assert "s3cret-pw" not in shown and repr(creds.signing_seed) not in shown
