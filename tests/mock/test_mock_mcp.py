"""Remote MCP tools: listing, calls, failures and approvals, as the GA server sends them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mockrealtime.mcp import CATALOGUE
from mockrealtime.session import Session
from mockrealtime.sessionconfig import SessionConfig, apply_ga_update

from .helpers import FakeClock, make_session, only, send, types, user_text

DOCS: dict[str, Any] = {
    "type": "mcp",
    "server_label": "docs",
    "server_url": "https://mcp.example.com/docs",
    "require_approval": "never",
}
ALL_TOOLS = [tool.name for tool in CATALOGUE]


def update(session: Session, **body: Any) -> list[dict[str, Any]]:
    return send(session, {"type": "session.update", "session": {"type": "realtime", **body}})


def respond(session: Session, **body: Any) -> list[dict[str, Any]]:
    """``response.create`` at pace 0: the whole response at once."""
    return send(session, {"type": "response.create", "response": body})


def text_session(*tools: dict[str, Any], **body: Any) -> tuple[Session, list[dict[str, Any]]]:
    session, _ = make_session()
    out = update(session, output_modalities=["text"], tools=list(tools), **body)
    return session, out


def test_adding_an_mcp_server_lists_its_tools_into_the_conversation() -> None:
    session, out = text_session(DOCS)
    assert types(out) == [
        "session.updated",
        "mcp_list_tools.in_progress",
        "conversation.item.added",
        "conversation.item.done",
        "mcp_list_tools.completed",
    ]
    assert out[0]["session"]["tools"] == [DOCS]
    item = only(out, "conversation.item.done")["item"]
    assert (item["type"], item["server_label"]) == ("mcp_list_tools", "docs")
    assert [tool["name"] for tool in item["tools"]] == ALL_TOOLS
    assert all(tool["input_schema"]["type"] == "object" for tool in item["tools"])
    assert {e["item_id"] for e in out if e["type"].startswith("mcp_list_tools.")} == {item["id"]}
    assert session.items[-1]["id"] == item["id"]


def test_the_same_server_is_listed_once_and_again_when_its_definition_changes() -> None:
    session, _ = text_session(DOCS)
    assert types(update(session, tools=[DOCS])) == ["session.updated"]
    assert types(update(session, tools=[{**DOCS, "require_approval": "always"}])) == [
        "session.updated"  # the approval policy does not change what the server lists
    ]
    narrowed = update(session, tools=[{**DOCS, "allowed_tools": ["fetch_doc"]}])
    assert "mcp_list_tools.completed" in types(narrowed)
    assert [t["name"] for t in only(narrowed, "conversation.item.done")["item"]["tools"]] == [
        "fetch_doc"
    ]


@pytest.mark.parametrize(
    ("allowed", "listed"),
    [
        (["search_docs", "no_such_tool"], ["search_docs"]),
        ({"read_only": True}, ["search_docs", "fetch_doc"]),
        ({"read_only": False}, ["create_ticket"]),
        ({"tool_names": ["create_ticket", "fetch_doc"]}, ["fetch_doc", "create_ticket"]),
    ],
)
def test_allowed_tools_narrows_the_list(allowed: Any, listed: list[str]) -> None:
    _, out = text_session({**DOCS, "allowed_tools": allowed})
    assert [t["name"] for t in only(out, "conversation.item.done")["item"]["tools"]] == listed


def test_a_server_that_cannot_list_its_tools_fails_and_offers_none() -> None:
    broken = {**DOCS, "server_url": "https://mcp.example.com/list-error"}
    session, out = text_session(broken, tool_choice="required")
    assert types(out)[-2:] == ["conversation.item.done", "mcp_list_tools.failed"]
    assert only(out, "conversation.item.done")["item"]["tools"] == []
    send(session, user_text("search docs for cats"))
    reply = respond(session)
    assert only(reply, "response.output_item.done")["item"]["type"] == "message"


def test_a_named_mcp_tool_is_called_with_the_ga_event_sequence() -> None:
    choice = {"type": "mcp", "server_label": "docs", "name": "search_docs"}
    session, _ = text_session(DOCS, tool_choice=choice)
    send(session, user_text("Find the pricing page"))
    out = respond(session)
    assert types(out) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    added = only(out, "response.output_item.added")["item"]
    assert (added["type"], added["arguments"], added["output"]) == ("mcp_call", "", None)
    deltas = "".join(e["delta"] for e in out if e["type"] == "response.mcp_call_arguments.delta")
    arguments = only(out, "response.mcp_call_arguments.done")["arguments"]
    assert deltas == arguments and set(json.loads(arguments)) == {"query"}
    call = only(out, "response.output_item.done")["item"]
    assert (call["server_label"], call["name"], call["error"]) == ("docs", "search_docs", None)
    assert json.loads(call["output"])["results"][0]["title"].startswith("About ")
    for kind in ("response.mcp_call.in_progress", "response.mcp_call.completed"):
        assert set(only(out, kind)) == {"type", "event_id", "item_id", "output_index"}
    assert only(out, "response.done")["response"]["output"] == [call]
    follow = respond(session)  # the model then speaks about the result
    text = only(follow, "response.output_text.done")["text"]
    assert text.startswith("The tool returned {")


def test_with_tool_choice_auto_the_model_calls_the_tool_the_user_names() -> None:
    session, _ = text_session(DOCS)
    send(session, user_text("please fetch doc 42"))
    item = only(respond(session), "response.output_item.done")["item"]
    assert (item["type"], item["name"]) == ("mcp_call", "fetch_doc")
    send(session, user_text("thanks"))
    assert only(respond(session), "response.output_item.done")["item"]["type"] == "message"


def test_a_failing_call_ends_with_mcp_call_failed_and_an_error_on_the_item() -> None:
    flaky = {**DOCS, "server_url": "https://mcp.example.com/call-error"}
    session, _ = text_session(flaky, tool_choice="required")
    send(session, user_text("go"))
    out = respond(session)
    assert "response.mcp_call.failed" in types(out)
    assert "response.mcp_call.completed" not in types(out)
    call = only(out, "response.output_item.done")["item"]
    assert call["output"] is None and call["error"]["type"] == "tool_execution_error"
    assert only(out, "response.done")["response"]["status"] == "completed"
    text = only(respond(session, tool_choice="auto"), "response.output_text.done")["text"]
    assert text.startswith("The tool call failed:")


def test_cancelling_while_the_arguments_stream_never_runs_the_call() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(clock=clock, pace=1.0, response_delay=0.01)
    update(session, tools=[DOCS], tool_choice="required")
    send(session, user_text("go"))
    respond(session)
    clock.now = 0.02
    assert "response.mcp_call_arguments.delta" in types(session.tick(), deltas=True)
    out = send(session, {"type": "response.cancel"})
    assert types(out)[:1] == ["response.mcp_call_arguments.done"]
    assert not any(kind.startswith("response.mcp_call.") for kind in types(out))
    assert only(out, "response.done")["response"]["status"] == "cancelled"


def test_approval_is_asked_by_default_then_the_approved_call_is_made() -> None:
    session, _ = text_session({**DOCS, "require_approval": None}, tool_choice="required")
    send(session, user_text("open a ticket"))
    asked = respond(session)
    assert types(asked) == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    request = only(asked, "response.output_item.added")["item"]
    assert request["type"] == "mcp_approval_request" and json.loads(request["arguments"])
    assert only(asked, "response.output_item.done")["item"] == request
    # answering nothing yet: the model asks instead of calling
    assert "Please approve" in only(respond(session), "response.output_text.done")["text"]
    answer = {
        "type": "mcp_approval_response",
        "approval_request_id": request["id"],
        "approve": True,
    }
    created = send(session, {"type": "conversation.item.create", "item": answer})
    assert types(created) == ["conversation.item.added", "conversation.item.done"]
    assert only(created, "conversation.item.done")["item"]["reason"] is None
    out = respond(session)
    call = only(out, "response.output_item.done")["item"]
    assert call["type"] == "mcp_call" and call["approval_request_id"] == request["id"]
    assert (call["name"], call["arguments"]) == (request["name"], request["arguments"])
    assert "response.mcp_call.completed" in types(out)


def test_a_declined_request_is_not_called() -> None:
    session, _ = text_session({**DOCS, "require_approval": "always"}, tool_choice="required")
    send(session, user_text("go"))
    request = only(respond(session), "response.output_item.done")["item"]
    answer = {
        "type": "mcp_approval_response",
        "approval_request_id": request["id"],
        "approve": False,
        "reason": "not now",
    }
    send(session, {"type": "conversation.item.create", "item": answer})
    out = respond(session)
    assert only(out, "response.output_item.done")["item"]["type"] == "message"
    assert only(out, "response.output_text.done")["text"].startswith("All right, I will not")


@pytest.mark.parametrize(
    ("policy", "asks"),
    [
        ({"never": {"read_only": True}}, {"search_docs": False, "create_ticket": True}),
        ({"always": {"tool_names": ["search_docs"]}}, {"search_docs": True, "create_ticket": True}),
        (
            {"never": {"tool_names": ["create_ticket"]}},
            {"search_docs": True, "create_ticket": False},
        ),
    ],
)
def test_require_approval_filters(policy: dict[str, Any], asks: dict[str, bool]) -> None:
    for name, expected in asks.items():
        choice = {"type": "mcp", "server_label": "docs", "name": name}
        session, _ = text_session({**DOCS, "require_approval": policy}, tool_choice=choice)
        send(session, user_text("go"))
        item = only(respond(session), "response.output_item.done")["item"]
        assert item["type"] == ("mcp_approval_request" if expected else "mcp_call"), name


def test_an_approval_for_an_unknown_request_is_refused() -> None:
    session, _ = text_session(DOCS)
    answer = {"type": "mcp_approval_response", "approval_request_id": "item_nope", "approve": True}
    error = only(send(session, {"type": "conversation.item.create", "item": answer}), "error")
    assert (error["error"]["code"], error["error"]["param"]) == (
        "invalid_value",
        "item.approval_request_id",
    )


def test_a_response_level_mcp_server_is_listed_before_the_response() -> None:
    session, _ = make_session()
    send(session, user_text("search docs for owls"))
    out = respond(session, tools=[DOCS], output_modalities=["text"])
    assert types(out)[:4] == [
        "mcp_list_tools.in_progress",
        "conversation.item.added",
        "conversation.item.done",
        "mcp_list_tools.completed",
    ]
    assert types(out)[4] == "response.created"
    assert only(out, "response.output_item.done")["item"]["name"] == "search_docs"


def test_a_client_secret_session_lists_its_servers_right_after_session_created() -> None:
    preset = apply_ga_update(SessionConfig(), {"type": "realtime", "tools": [DOCS]})
    session, opening = make_session(preset=preset)
    assert types(opening) == [
        "session.created",
        "mcp_list_tools.in_progress",
        "conversation.item.added",
        "conversation.item.done",
        "mcp_list_tools.completed",
    ]
    assert session.items[0]["type"] == "mcp_list_tools"


@pytest.mark.parametrize(
    ("tool", "code", "param"),
    [
        ({"type": "mcp", "server_url": "https://x"}, "missing_required_parameter", "server_label"),
        ({"type": "mcp", "server_label": "x"}, "missing_required_parameter", "server_url"),
        (
            {
                "type": "mcp",
                "server_label": "x",
                "server_url": "u",
                "connector_id": "connector_gmail",
            },
            "invalid_value",
            "connector_id",
        ),
        (
            {"type": "mcp", "server_label": "x", "connector_id": "gmail"},
            "invalid_value",
            "connector_id",
        ),
        ({**DOCS, "require_approval": "sometimes"}, "invalid_value", "require_approval"),
        ({**DOCS, "allowed_tools": "search_docs"}, "invalid_type", "allowed_tools"),
        ({**DOCS, "bogus": 1}, "unknown_parameter", "bogus"),
    ],
)
def test_bad_mcp_tools_discard_the_whole_update(
    tool: dict[str, Any], code: str, param: str
) -> None:
    session, _ = make_session()
    before = session.render_session()
    error = only(update(session, tools=[tool], instructions="changed"), "error")["error"]
    assert (error["code"], error["param"]) == (code, f"session.tools[0].{param}")
    assert session.render_session() == before and session.items == []


def test_mcp_server_labels_must_be_unique() -> None:
    session, _ = make_session()
    error = only(update(session, tools=[DOCS, DOCS]), "error")["error"]
    assert error["param"] == "session.tools[0].server_label"


def test_a_connector_is_listed_like_a_server() -> None:
    calendar = {"type": "mcp", "server_label": "cal", "connector_id": "connector_googlecalendar"}
    _, out = text_session({**calendar, "authorization": "token"})
    assert types(out)[-1] == "mcp_list_tools.completed"


def test_the_beta_dialect_has_no_mcp_tools() -> None:
    session, _ = make_session("beta")
    out = send(session, {"type": "session.update", "session": {"tools": [DOCS]}})
    assert only(out, "error")["error"]["param"] == "session.tools[0].type"


def test_mcp_items_can_be_replayed_by_the_client() -> None:
    session, _ = make_session()
    for item in (
        {"type": "mcp_list_tools", "server_label": "docs", "tools": []},
        {"type": "mcp_approval_request", "server_label": "docs", "name": "n", "arguments": "{}"},
        {"type": "mcp_call", "server_label": "docs", "name": "n", "arguments": "{}", "output": "1"},
    ):
        out = send(session, {"type": "conversation.item.create", "item": item})
        assert types(out) == ["conversation.item.added", "conversation.item.done"], out
    error = only(
        send(
            session,
            {"type": "conversation.item.create", "item": {"type": "mcp_call", "server_label": "d"}},
        ),
        "error",
    )["error"]
    assert (error["code"], error["param"]) == ("missing_required_parameter", "item.name")
