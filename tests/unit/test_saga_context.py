"""SagaContext: attribute access, storable values only, lossless tagged encoding."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from enum import IntEnum, StrEnum

import orjson
import pytest

from saga import SagaContext, SagaContextError
from saga.context import decode_context, encode_context


class Color(StrEnum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


def test_attribute_and_item_access_are_the_same_entry() -> None:
    ctx = SagaContext(order_id=1)
    ctx.total = 5
    ctx["name"] = "x"
    assert ctx["order_id"] == ctx.order_id == 1
    assert ctx.total == ctx["total"] == 5
    assert ctx.name == "x"
    assert dict(ctx) == {"order_id": 1, "total": 5, "name": "x"}
    assert len(ctx) == 3 and "total" in ctx and "nope" not in ctx
    del ctx.total
    del ctx["name"]
    assert ctx == {"order_id": 1}
    with pytest.raises(AttributeError, match="no entry 'missing'"):
        _ = ctx.missing
    with pytest.raises(AttributeError):
        del ctx.missing
    with pytest.raises(KeyError):
        _ = ctx["missing"]


def test_constructor_takes_a_mapping_and_keywords() -> None:
    ctx = SagaContext({"a": 1}, b=2)
    assert ctx == SagaContext(a=1, b=2)
    assert ctx != SagaContext(a=1)
    assert ctx != 3
    assert repr(ctx) == "SagaContext(a=1, b=2)"
    copy = ctx.copy()
    copy.c = 3
    assert "c" not in ctx


def test_reserved_and_private_names_cannot_be_set_as_attributes() -> None:
    ctx = SagaContext()
    with pytest.raises(AttributeError, match="use ctx\\['copy'\\]"):
        ctx.copy = 1  # type: ignore[method-assign]
    with pytest.raises(AttributeError):
        ctx._secret = 1
    ctx["copy"] = 1  # still fine as an item
    assert ctx["copy"] == 1


def test_unstorable_value_is_refused_where_it_is_set_naming_the_key() -> None:
    ctx = SagaContext()
    with pytest.raises(SagaContextError, match=r"'handle'.*object is not storable") as info:
        ctx.handle = object()
    assert info.value.key == "handle"
    assert info.value.step is None
    with pytest.raises(SagaContextError) as nested:
        ctx["items"] = [1, {"deep": {1, 2}}]
    assert nested.value.key == "items"
    assert "items[1].deep" in str(nested.value)
    with pytest.raises(SagaContextError, match="non-finite"):
        ctx.ratio = float("nan")
    with pytest.raises(SagaContextError, match="dict key 1 is not a string"):
        ctx.bad = {1: "x"}
    with pytest.raises(SagaContextError, match="keys must be strings"):
        ctx[3] = 1  # type: ignore[index]
    with pytest.raises(SagaContextError):
        SagaContext(bad=object())
    assert len(ctx) == 0


def test_round_trip_keeps_types() -> None:
    key = uuid.uuid4()
    aware = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2024, 5, 1, 12, 30, 15, 123456)
    ctx = SagaContext(
        id=key,
        aware=aware,
        naive=naive,
        day=date(2024, 5, 1),
        amount=Decimal("10.50"),
        big=2**63 - 1,
        negative=-(2**63),
        pair=(1, "a", (2.5, None)),
        nested={"ids": [key, key], "when": {"at": aware}, "flag": True},
        text="hello",
        number=3.25,
        nothing=None,
    )
    restored = SagaContext.from_json(ctx.to_json())
    assert restored == ctx
    assert type(restored.id) is uuid.UUID
    assert restored.aware.utcoffset() == timedelta(hours=2)
    assert restored.naive.tzinfo is None
    assert type(restored.day) is date
    assert type(restored.amount) is Decimal and str(restored.amount) == "10.50"
    assert restored.big == 2**63 - 1 and restored.negative == -(2**63)
    assert restored.pair == (1, "a", (2.5, None)) and type(restored.pair[2]) is tuple
    assert restored.nested["ids"][0] == key


def test_user_dicts_that_look_like_tags_are_escaped() -> None:
    ctx = SagaContext(
        tagged={"$uuid": "not-a-uuid"},
        escaped={"$esc": {"x": 1}},
        list_of=[{"$dt": "nope"}],
        two_keys={"$uuid": "x", "other": 1},
    )
    encoded = encode_context(ctx)
    assert encoded["tagged"] == {"$esc": {"$uuid": "not-a-uuid"}}
    restored = SagaContext.from_json(orjson.dumps(encoded))
    assert restored == ctx


def test_subclasses_of_accepted_types_are_stored_as_the_base_type() -> None:
    class Stamp(datetime):
        pass

    ctx = SagaContext(
        color=Color.RED,
        level=Level.HIGH,
        flag=True,
        ordered=OrderedDict(a=1),
        stamp=Stamp(2024, 1, 1, tzinfo=UTC),
    )
    restored = decode_context(orjson.loads(ctx.to_json()))
    assert restored.color == "red" and type(restored.color) is str
    assert restored.level == 3 and type(restored.level) is int
    assert restored.flag is True
    assert restored.ordered == {"a": 1}
    assert type(restored.stamp) is datetime


def test_encode_context_names_the_step() -> None:
    data = {"ok": 1, "bad": [object()]}
    with pytest.raises(SagaContextError, match="set in step 'reserve'") as info:
        encode_context(data, step="reserve")
    assert info.value.key == "bad"
    assert info.value.step == "reserve"


def test_nested_saga_context_is_stored_as_a_dict() -> None:
    ctx = SagaContext(inner=SagaContext(x=1))
    assert SagaContext.from_json(ctx.to_json()).inner == {"x": 1}


def walked(ctx: SagaContext) -> dict[str, object]:
    """The encoding of every entry, walked one by one (what `encode_context` does with a plain dict)."""
    return encode_context(dict(ctx.items()))


def test_a_context_encodes_like_a_full_walk_through_every_kind_of_write() -> None:
    ctx = SagaContext({"n": 1, "items": [1], "big": Decimal(2**70), "f": 1.5}, when=date(2024, 1, 1))
    states = [encode_context(ctx)]
    writes = [
        lambda: ctx.__setitem__("n", [1, 2]),  # plain -> nested
        lambda: ctx.__setitem__("items", "now plain"),  # nested -> plain
        lambda: ctx["n"].append(uuid.UUID(int=1)),  # in place, no write through the context
        lambda: setattr(ctx, "total", Decimal("2.50")),
        lambda: setattr(ctx, "total", 2**63 - 1),
        lambda: setattr(ctx, "total", -(2**63)),
        lambda: ctx.update({"a": (1, 2), "b": None, "c": Color.RED, "d": Level.HIGH}),
        lambda: ctx.setdefault("e", {"$uuid": "looks like a tag"}),
        lambda: ctx.pop("a"),
        lambda: delattr(ctx, "when"),
        lambda: ctx.__delitem__("big"),
        lambda: ctx.__setitem__("big", True),
        lambda: ctx["e"].update(more=[datetime(2024, 1, 1, tzinfo=UTC)]),
    ]
    for write in writes:
        write()
        encoded = encode_context(ctx)
        assert encoded == walked(ctx) and list(encoded) == list(ctx)
        assert orjson.dumps(encoded) == orjson.dumps(walked(ctx))
        states.append(encoded)
    # Nothing handed out earlier changed with the context (the engine keeps them as rollback points).
    assert states[0] == {
        "n": 1,
        "items": [1],
        "big": {"$dec": str(2**70)},
        "f": 1.5,
        "when": {"$date": "2024-01-01"},
    }
    assert states[2]["n"] == [1, 2] and states[3]["n"] == [1, 2, {"$uuid": str(uuid.UUID(int=1))}]
    ctx.clear()
    assert encode_context(ctx) == {} and ctx == {}


def test_copies_and_decoded_contexts_encode_like_a_full_walk() -> None:
    ctx = SagaContext(n=1, items=[{"at": date(2024, 1, 1)}], plain="x")
    for other in (
        ctx.copy(),
        SagaContext(ctx),
        SagaContext(ctx, more=(1,)),
        decode_context(encode_context(ctx)),
        SagaContext.from_json(ctx.to_json()),
    ):
        assert encode_context(other) == walked(other)
        other["items"].append(5)  # nested values may be shared by a shallow copy: still encoded fresh
        assert encode_context(other) == walked(other)
        assert encode_context(ctx) == walked(ctx)


def test_a_nested_value_made_unstorable_in_place_is_refused_when_encoded_or_copied() -> None:
    ctx = SagaContext(ok=1, items=[])
    ctx["items"].append(object())
    with pytest.raises(SagaContextError, match="set in step 'pack'") as info:
        encode_context(ctx, step="pack")
    assert info.value.key == "items"
    with pytest.raises(SagaContextError):
        SagaContext(ctx)
