"""The conversation's item order against a reference list, under random create/delete."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .helpers import make_session, send, user_text


class ConversationOrder(RuleBasedStateMachine):
    """Items are appended, prepended ("root") or inserted after an id; deletes remove them."""

    def __init__(self) -> None:
        super().__init__()
        self.session, _ = make_session()
        self.model: list[str] = []
        self.counter = 0

    def _create(self, previous: str | None) -> None:
        self.counter += 1
        extra = {} if previous is None else {"previous_item_id": previous}
        out = send(self.session, user_text(f"m{self.counter}", **extra))
        added = out[0]
        assert added["type"] == "conversation.item.added", out
        item_id = added["item"]["id"]
        if previous is None:
            index = len(self.model)
        elif previous == "root":
            index = 0
        else:
            index = self.model.index(previous) + 1
        expected_previous = self.model[index - 1] if index > 0 else None
        assert added["previous_item_id"] == expected_previous
        self.model.insert(index, item_id)

    @rule()
    def append(self) -> None:
        self._create(None)

    @rule()
    def prepend(self) -> None:
        self._create("root")

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def insert_after(self, data: st.DataObject) -> None:
        self._create(data.draw(st.sampled_from(self.model)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(self.model))
        out = send(self.session, {"type": "conversation.item.delete", "item_id": victim})
        assert [e["type"] for e in out] == ["conversation.item.deleted"]
        self.model.remove(victim)

    @rule()
    def unknown_ids_are_errors(self) -> None:
        out = send(self.session, {"type": "conversation.item.retrieve", "item_id": "item_gone"})
        assert out[0]["error"]["code"] == "item_not_found"

    @invariant()
    def order_matches(self) -> None:
        assert [item["id"] for item in self.session.items] == self.model


ConversationOrder.TestCase.settings = settings(
    max_examples=40, stateful_step_count=20, deadline=None
)
test_conversation_order = ConversationOrder.TestCase
