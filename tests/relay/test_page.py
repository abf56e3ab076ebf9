"""The demo page's files, read without a browser: which CSS rules style the status pill, and
what the page shows for the offline fake. (tests/relay/test_browser.py drives it in Chromium.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.clients.talk import FAKE_MARKER

STATIC = Path(__file__).parents[2] / "src" / "relay" / "clients" / "static"
CSS = (STATIC / "style.css").read_text()
HTML = (STATIC / "index.html").read_text()
JS = (STATIC / "app.js").read_text()


@dataclass(frozen=True)
class Rule:
    selector: str
    body: str


def rules(css: str) -> list[Rule]:
    """The style rules of a stylesheet, those inside @media too (not @keyframes' steps)."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    found: list[Rule] = []
    pos = 0
    while (open_at := css.find("{", pos)) >= 0:
        prelude = css[pos:open_at].strip()
        depth, end = 1, open_at + 1
        while depth:
            depth += {"{": 1, "}": -1}.get(css[end], 0)
            end += 1
        body = css[open_at + 1 : end - 1]
        if prelude.startswith("@media"):
            found += rules(body)
        elif not prelude.startswith("@"):
            found += [Rule(s.strip(), body) for s in prelude.split(",")]
        pos = end
    return found


def matches(selector: str, tag: str, id_: str, classes: set[str]) -> bool:
    """Whether the selector's subject (its last compound) can match the element; combinators
    before it are taken as satisfied, so this errs towards a match."""
    subject = re.split(r"[\s>+~]+", selector.strip())[-1]
    subject = re.sub(r"::?[a-z-]+(\([^)]*\))?", "", subject)  # pseudo-classes and -elements
    if "[" in subject:
        return False  # attribute selectors: the pill has none of the attributes used
    name = re.match(r"^[a-z*]*", subject).group(0)  # type: ignore[union-attr]
    if name not in ("", "*", tag):
        return False
    ids = re.findall(r"#([\w-]+)", subject)
    wanted = set(re.findall(r"\.([\w-]+)", subject))
    return all(i == id_ for i in ids) and wanted <= classes


def pill_states() -> set[str]:
    """Every state the page gives the pill: the names in setState's first argument."""
    return {
        state
        for argument in re.findall(r"setState\(([^,)]*)", JS)
        for state in re.findall(r'"(\w+)"', argument)
    }


def test_the_parser_finds_the_rules_it_is_asked_about() -> None:
    selectors = {rule.selector for rule in rules(CSS)}
    assert {".pill", ".pill.error", "header", ":root", "*"} <= selectors
    assert not any(s.endswith("%") for s in selectors)  # keyframe steps are not rules


@pytest.mark.parametrize("state", ["idle", "connecting", "live", "closed", "error"])
def test_only_the_pills_own_rules_style_it(state: str) -> None:
    """A rule for something else that the pill's state class happens to match (as `.error`,
    for the error message, did) moved its dot onto its text and grew the header by 20 px."""
    assert state in pill_states()
    pill = re.search(r'<span id="status" class="pill (\w+)"', HTML)
    assert pill, "the status pill"
    styling = [
        rule.selector
        for rule in rules(CSS)
        if matches(rule.selector, "span", "status", {"pill", state})
    ]
    assert styling, state
    strays = [s for s in styling if ".pill" not in s and s not in ("*", ":root")]
    assert strays == [], f"rules for other elements also style the {state} pill: {strays}"


def test_the_messages_above_the_conversation_do_not_style_the_pill() -> None:
    for element in ("error", "fake"):
        found = re.search(rf'<p id="{element}" class="([\w ]+)"', HTML)
        assert found, element
        classes = set(found.group(1).split())
        message_rules = [r for r in rules(CSS) if matches(r.selector, "p", element, classes)]
        assert any("padding" in r.body for r in message_rules), element
        for state in pill_states():
            assert not (classes & {state}), f"#{element} shares the class {state} with the pill"


def test_the_page_says_when_the_upstream_is_the_offline_fake() -> None:
    notice = re.search(r'<p id="fake"[^>]*hidden>(.*?)</p>', HTML, re.S)
    assert notice and "offline fake" in notice.group(1) and "made-up" in notice.group(1)
    assert f"event.{FAKE_MARKER}" in JS  # the field mockrealtime puts in session.created
