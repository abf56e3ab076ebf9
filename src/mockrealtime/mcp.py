"""The fake's remote MCP servers: tool definitions, a scripted tool catalogue, approval policy.

The real Realtime API connects to the MCP server named by an ``mcp`` tool (``server_url``,
``connector_id`` or ``tunnel_id``), lists its tools and runs the calls the model makes. The
fake connects to nothing: every MCP server it is given serves the same scripted catalogue
(``CATALOGUE``), narrowed by the tool's ``allowed_tools``, and a call returns a result
computed from its arguments, so sessions stay deterministic and offline.

Failures are chosen by the server URL (or tunnel id): one containing ``list-error`` fails
to list its tools (``mcp_list_tools.failed``); one containing ``call-error`` lists them but
every call fails with a ``tool_execution_error``.

Sans-IO like the session: the session turns these results into events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .validation import (
    ClientError,
    check_keys,
    expect_bool,
    expect_choice,
    expect_object,
    expect_str,
    invalid_type,
    missing_parameter,
)

LIST_FAILURE_MARKER: Final = "list-error"
CALL_FAILURE_MARKER: Final = "call-error"

CONNECTORS: Final = (
    "connector_dropbox",
    "connector_gmail",
    "connector_googlecalendar",
    "connector_googledrive",
    "connector_microsoftteams",
    "connector_outlookcalendar",
    "connector_outlookemail",
    "connector_sharepoint",
)
_TOOL_KEYS: Final = frozenset(
    {
        "type",
        "server_label",
        "server_url",
        "connector_id",
        "tunnel_id",
        "allowed_tools",
        "allowed_callers",
        "authorization",
        "headers",
        "require_approval",
        "server_description",
        "defer_loading",
    }
)
_ADDRESS_KEYS: Final = ("server_url", "connector_id", "tunnel_id")


@dataclass(frozen=True)
class McpTool:
    """One tool of the scripted catalogue: what ``tools/list`` shows and what a call returns."""

    name: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool
    run: Callable[[dict[str, Any]], Any]

    def listed(self) -> dict[str, Any]:
        """The entry of an ``mcp_list_tools`` item (the SDK's ``RealtimeMcpListTools.Tool``)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
            "annotations": {"readOnlyHint": self.read_only},
        }


def _string_schema(**properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


CATALOGUE: Final = (
    McpTool(
        "search_docs",
        "Search the documentation; returns the ids and titles of matching documents.",
        _string_schema(query={"type": "string", "minLength": 1}),
        read_only=True,
        run=lambda args: {"results": [{"id": "doc-1", "title": f"About {args['query']}"}]},
    ),
    McpTool(
        "fetch_doc",
        "Fetch one document by its id.",
        _string_schema(id={"type": "string", "minLength": 1}),
        read_only=True,
        run=lambda args: {"id": args["id"], "text": f"Document {args['id']} says hello."},
    ),
    McpTool(
        "create_ticket",
        "Open a support ticket.",
        _string_schema(
            title={"type": "string", "minLength": 1},
            priority={"type": "string", "enum": ["low", "normal", "high"]},
        ),
        read_only=False,
        run=lambda args: {"ticket": "T-1001", "status": "open", "priority": args["priority"]},
    ),
)
_BY_NAME: Final = {tool.name: tool for tool in CATALOGUE}


# --- the tool definition in session.tools / response.tools ----------------------------


def parse_mcp_tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    """Validate an ``{"type": "mcp", ...}`` tool; returns it unchanged (it is echoed as given)."""
    check_keys(tool, _TOOL_KEYS, param)
    if "server_label" not in tool:
        raise missing_parameter(f"{param}.server_label")
    if not expect_str(tool["server_label"], f"{param}.server_label"):
        raise ClientError(
            "invalid_value",
            f"Invalid '{param}.server_label': empty string.",
            f"{param}.server_label",
        )
    given = [key for key in _ADDRESS_KEYS if tool.get(key) is not None]
    if len(given) != 1:
        raise ClientError(
            "invalid_value" if given else "missing_required_parameter",
            f"Invalid '{param}': exactly one of 'server_url', 'connector_id' or 'tunnel_id' "
            "must be provided.",
            f"{param}.{given[-1] if given else 'server_url'}",
        )
    for key in ("server_url", "tunnel_id", "authorization", "server_description"):
        if tool.get(key) is not None:
            expect_str(tool[key], f"{param}.{key}")
    if tool.get("connector_id") is not None:
        expect_choice(tool["connector_id"], f"{param}.connector_id", CONNECTORS)
    if tool.get("headers") is not None:
        for name, value in expect_object(tool["headers"], f"{param}.headers").items():
            expect_str(value, f"{param}.headers.{name}")
    if tool.get("defer_loading") is not None:
        expect_bool(tool["defer_loading"], f"{param}.defer_loading")
    if tool.get("allowed_tools") is not None:
        _parse_names(tool["allowed_tools"], f"{param}.allowed_tools")
    approval = tool.get("require_approval")
    if isinstance(approval, dict):
        check_keys(approval, {"always", "never"}, f"{param}.require_approval")
        for key, value in approval.items():
            if value is not None:
                _parse_filter(value, f"{param}.require_approval.{key}")
    elif approval is not None:
        expect_choice(approval, f"{param}.require_approval", ("always", "never"))
    return dict(tool)


def _parse_names(value: Any, param: str) -> None:
    """``allowed_tools``: a list of tool names or a filter object."""
    if isinstance(value, list):
        for i, name in enumerate(value):
            expect_str(name, f"{param}[{i}]")
    else:
        _parse_filter(value, param)


def _parse_filter(value: Any, param: str) -> None:
    obj = expect_object(value, param)
    check_keys(obj, {"tool_names", "read_only"}, param)
    if obj.get("read_only") is not None:
        expect_bool(obj["read_only"], f"{param}.read_only")
    if obj.get("tool_names") is not None:
        names = obj["tool_names"]
        if not isinstance(names, list):
            raise invalid_type(f"{param}.tool_names", "an array", names)
        for i, name in enumerate(names):
            expect_str(name, f"{param}.tool_names[{i}]")


def _matches(tool: McpTool, spec: Any) -> bool:
    """Does ``tool`` pass an ``allowed_tools`` list or a ``{tool_names, read_only}`` filter?"""
    if isinstance(spec, list):
        return tool.name in spec
    names, read_only = spec.get("tool_names"), spec.get("read_only")
    return (names is None or tool.name in names) and (
        read_only is None or read_only == tool.read_only
    )


# --- listing, approval, calls ---------------------------------------------------------


def _address(definition: dict[str, Any]) -> str:
    return str(definition.get("server_url") or definition.get("tunnel_id") or "")


def listing_key(definition: dict[str, Any]) -> dict[str, Any]:
    """The part of a definition that decides what listing yields (approval policy aside)."""
    return {
        k: v for k, v in definition.items() if k not in ("require_approval", "server_description")
    }


def list_tools(definition: dict[str, Any]) -> list[dict[str, Any]] | None:
    """What listing the server's tools yields (``allowed_tools`` applied); None if it fails."""
    if LIST_FAILURE_MARKER in _address(definition):
        return None
    allowed = definition.get("allowed_tools")
    return [t.listed() for t in CATALOGUE if allowed is None or _matches(t, allowed)]


def needs_approval(definition: dict[str, Any], name: str) -> bool:
    """The ``require_approval`` policy; approval is required unless a rule says ``never``."""
    policy = definition.get("require_approval")
    if policy is None or isinstance(policy, str):
        return policy != "never"
    tool = _BY_NAME[name]
    if policy.get("always") is not None and _matches(tool, policy["always"]):
        return True
    return not (policy.get("never") is not None and _matches(tool, policy["never"]))


def call(definition: dict[str, Any], name: str, arguments: str) -> tuple[str | None, Any]:
    """Run a scripted tool: ``(output, None)`` on success, ``(None, error)`` on failure."""
    if CALL_FAILURE_MARKER in _address(definition):
        message = f"The MCP server '{definition['server_label']}' failed to run '{name}'."
        return None, {"type": "tool_execution_error", "message": message}
    try:
        args = orjson.loads(arguments)
        result = _BY_NAME[name].run(args)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, {"type": "tool_execution_error", "message": f"Invalid arguments for {name}."}
    return orjson.dumps(result).decode(), None


# --- MCP items a client creates (e.g. replaying a conversation, answering an approval) ----

ITEM_FIELDS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # kind: (required string fields, optional fields)
    "mcp_approval_response": (("approval_request_id",), ("approve", "reason")),
    "mcp_approval_request": (("server_label", "name", "arguments"), ()),
    "mcp_call": (("server_label", "name", "arguments"), ("approval_request_id", "output", "error")),
    "mcp_list_tools": (("server_label",), ("tools",)),
}
ITEM_KEYS: Final = frozenset(k for req, opt in ITEM_FIELDS.values() for k in (*req, *opt))


def parse_mcp_item(item: dict[str, Any], kind: str, param: str) -> dict[str, Any]:
    """Validate the kind-specific fields of a client-created MCP item (type, id done already)."""
    required, optional = ITEM_FIELDS[kind]
    check_keys(item, {"id", "type", "object", *required, *optional}, param)
    out: dict[str, Any] = {}
    for key in required:
        if key not in item:
            raise missing_parameter(f"{param}.{key}")
        out[key] = expect_str(item[key], f"{param}.{key}")
    if kind == "mcp_approval_response":
        if "approve" not in item:
            raise missing_parameter(f"{param}.approve")
        out["approve"] = expect_bool(item["approve"], f"{param}.approve")
        reason = item.get("reason")
        out["reason"] = None if reason is None else expect_str(reason, f"{param}.reason")
    elif kind == "mcp_call":
        for key in ("approval_request_id", "output"):
            value = item.get(key)
            out[key] = None if value is None else expect_str(value, f"{param}.{key}")
        error = item.get("error")
        out["error"] = None if error is None else dict(expect_object(error, f"{param}.error"))
    elif kind == "mcp_list_tools":
        if "tools" not in item:
            raise missing_parameter(f"{param}.tools")
        tools = item["tools"]
        if not isinstance(tools, list):
            raise invalid_type(f"{param}.tools", "an array", tools)
        out["tools"] = [dict(expect_object(t, f"{param}.tools[{i}]")) for i, t in enumerate(tools)]
    return out
