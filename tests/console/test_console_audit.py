"""The audit page: every operator action, filterable, paginated, read-only."""

from __future__ import annotations

import re

import pytest
from flask.testing import FlaskClient

from engine import SagaEngine
from engine.origins import Origin, OriginKind
from tests.console.support import text


def _cancel_some(saga_engine: SagaEngine, count: int, actor: str = "ann") -> list[str]:
    ids = []
    for n in range(count):
        inst = saga_engine.start("order", {"n": n}).instance
        saga_engine.operations.cancel(
            inst.id, actor=actor, reason=f"reason {n}", expected_version=inst.version
        )
        ids.append(inst.id)
    return ids


def test_lists_who_what_when_why_and_the_state_change(
    viewer: FlaskClient, saga_engine: SagaEngine
) -> None:
    [saga_id] = _cancel_some(saga_engine, 1)
    html = text(viewer.get("/audit"))
    row = html.split('id="audit"')[1]
    for shown in ("ann", "cancel", saga_id, "reason 0", "running", "cancelled", "v1→v2"):
        assert shown in row


def test_filters_by_actor_action_and_saga(viewer: FlaskClient, saga_engine: SagaEngine) -> None:
    ann = _cancel_some(saga_engine, 2, actor="ann")
    bob = _cancel_some(saga_engine, 1, actor="bob")
    by_bob = text(viewer.get("/audit?actor=bob"))
    assert bob[0] in by_bob and ann[0] not in by_bob
    by_saga = text(viewer.get(f"/audit?saga_id={ann[1]}"))
    assert ann[1] in by_saga and ann[0] not in by_saga
    assert "No operator actions" in text(viewer.get("/audit?action=retry"))


def test_pages_newest_first(viewer: FlaskClient, saga_engine: SagaEngine) -> None:
    ids = _cancel_some(saga_engine, 52, actor="ann")
    first = text(viewer.get("/audit?actor=ann"))
    older = re.search(r'href="(/audit\?[^"]*before=\d+)">Older', first)
    assert older is not None
    second = text(viewer.get(older.group(1).replace("&amp;", "&")))
    assert ids[-1] in first and ids[0] not in first
    assert ids[0] in second and ids[1] in second and ids[-1] not in second
    assert "Older »" not in second


def test_shows_the_claimed_actor_beside_the_origin_and_filters_by_origin(
    operator: FlaskClient, viewer: FlaskClient, saga_engine: SagaEngine
) -> None:
    clicked = saga_engine.start("order", {}).instance
    done = operator.post(
        f"/sagas/{clicked.id}/actions/cancel",
        data={"reason": "duplicate", "expected_version": clicked.version},
    )
    assert done.status_code == 302
    # Someone at a shell claims to be the same operator: the origin tells them apart.
    typed = saga_engine.start("order", {}).instance
    saga_engine.operations.cancel(
        typed.id,
        actor="operator",
        reason="duplicate",
        expected_version=typed.version,
        origin=Origin(OriginKind.CLI, "mallory@laptop"),
    )

    everything = text(viewer.get("/audit")).split('id="audit"')[1]
    from_cli = text(viewer.get("/audit?origin=cli")).split('id="audit"')[1]
    from_console = text(viewer.get("/audit?origin=console")).split('id="audit"')[1]

    assert "mallory@laptop" in everything and 'class="origin origin-console"' in everything
    assert typed.id in from_cli and clicked.id not in from_cli
    assert "mallory@laptop" in from_cli and "origin-cli" in from_cli
    assert clicked.id in from_console and typed.id not in from_console
    assert '<option value="cli" selected>' in text(viewer.get("/audit?origin=cli"))
    instance_page = text(viewer.get(f"/sagas/{typed.id}")).split('id="operator-actions"')[1]
    assert "mallory@laptop" in instance_page


@pytest.mark.parametrize(
    "query", ["action=delete", "before=abc", "saga_id=" + "x" * 37, "origin=root"]
)
def test_malformed_filters_are_400(viewer: FlaskClient, query: str) -> None:
    assert viewer.get(f"/audit?{query}").status_code == 400


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_the_log_cannot_be_changed_through_the_console(admin: FlaskClient, method: str) -> None:
    assert getattr(admin, method)("/audit").status_code == 405
