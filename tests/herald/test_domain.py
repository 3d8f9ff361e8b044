"""``Domain``: declaring commands, handlers, topic rules and event types, and serving a domain that is not the chat.

The ``orders`` domain below is what a user's own project would write: a command with a JSON Schema
(the one source of validation, of ``/openapi.json`` and of ``/asyncapi.json``), a handler that
stores the order and ends the operation with a 303 target, a read route, a topic rule and an
event type. It is served in-process by the embedded worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herald import Context, Domain, DomainError, Gateway, HTTPProblem, SchemaError, create_app
from herald.domain import Catalog, TopicRule
from herald.settings import Settings
from tests.herald.http.harness import Herald, assert_problem, in_process

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["item", "qty"],
    "additionalProperties": False,
    "properties": {
        "item": {"type": "string", "minLength": 1},
        "qty": {"type": "integer", "minimum": 1},
        "note": {"type": "string", "maxLength": 10,
                 "x-problem": {"maxLength": {"kind": "too-long", "title": "Note too long"}}},
        "shipping": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}},
        },
    },
}
CONFIRMED_SCHEMA = {"type": "object", "required": ["id", "item", "qty"],
                    "properties": {"id": {"type": "string"}, "item": {"type": "string"}, "qty": {"type": "integer"}}}
SHOPS = {"north", "south"}

orders = Domain("orders", title="Orders")


@orders.command("POST", "/shops/{shop}/orders", event="OrderPlaced", schema=ORDER_SCHEMA, subject="shops/{shop}")
def place(params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """Place an order in a shop."""
    if params["shop"] not in SHOPS:
        raise HTTPProblem(404, f"there is no shop {params['shop']!r}", kind="no-such-shop")
    return {"shop": params["shop"], "item": body["item"], "qty": body["qty"]}


@orders.handler("OrderPlaced")
async def confirm(ctx: Context) -> None:
    """Store the order and succeed with it, the order's URL as the 303 target."""
    order = {"id": ctx.operation_id, **ctx.data}
    path = f"/orders/{ctx.operation_id}"
    await ctx.put_resource(path, order, ttl=60)
    ctx.stage("OrderConfirmed", order, topics=[f"orders/{ctx.operation_id}"])
    await ctx.succeed(order, location=path)


@orders.route("GET", "/orders/{id}")
async def read_order(request: Request) -> Response:
    """One order, as the worker stored it."""
    order = await Gateway.of(request).resource(f"/orders/{request.path_params['id']}")
    if order is None:
        raise HTTPProblem(404, "no such order", kind="no-such-order")
    return JSONResponse(order)


orders.topic("orders/{id}", subscribe="token", summary="One order's events.")
orders.event("OrderConfirmed", schema=CONFIRMED_SCHEMA, summary="An order was stored.", topics=["orders/{id}"])


@pytest.fixture
async def shop() -> AsyncIterator[Herald]:
    """Herald serving only the orders domain, its handlers on the embedded worker."""
    async with in_process(domains=[orders]) as herald:
        yield herald


def noop(params: dict[str, str], body: Any) -> Any:
    """A command function for declarations that are never served."""
    return body


async def nothing(ctx: Context) -> None:
    """A handler for declarations that are never run."""


# Declaring -----------------------------------------------------------------------------

def test_a_command_is_declared_with_its_method_path_event_and_schema() -> None:
    (command,) = orders.commands
    assert (command.method, command.path, command.event_type) == ("POST", "/shops/{shop}/orders", "OrderPlaced")
    assert command.schema is ORDER_SCHEMA
    assert command.summary == "Place an order in a shop."
    parsed = command.parse({"shop": "north"}, {"item": "tea", "qty": 2})
    assert (parsed.data, parsed.subject) == ({"shop": "north", "item": "tea", "qty": 2}, "shops/north")


def test_the_same_command_declared_twice_is_refused() -> None:
    domain = Domain("twice")
    domain.command("POST", "/things", event="ThingAsked")(noop)
    with pytest.raises(DomainError, match="declared twice"):
        domain.command("post", "/things", event="OtherThingAsked")(noop)


def test_a_second_handler_for_an_event_type_is_refused() -> None:
    domain = Domain("twice")
    domain.handler("ThingAsked")(nothing)
    with pytest.raises(DomainError, match="two handlers"):
        domain.handler("ThingAsked")(nothing)


@pytest.mark.parametrize("event_type", ["", "1Thing", "Thing Asked", "Thing/Asked", "herald.ThingAsked",
                                        "herald.operation.succeeded", "x" * 129])
def test_an_unusable_event_type_is_refused_wherever_it_is_declared(event_type: str) -> None:
    domain = Domain("bad")
    with pytest.raises(DomainError):
        domain.command("POST", "/things", event=event_type)
    with pytest.raises(DomainError):
        domain.handler(event_type)
    with pytest.raises(DomainError):
        domain.event(event_type)
    assert domain.commands == [] and domain.handlers == {} and domain.events == {}


@pytest.mark.parametrize(("method", "path"), [("GET", "/things"), ("POST", "things")])
def test_a_command_needs_a_writing_method_and_an_absolute_path(method: str, path: str) -> None:
    with pytest.raises(DomainError):
        Domain("bad").command(method, path, event="ThingAsked")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "no-such-type"},
        {"type": "object", "required": "item"},
        {"type": "string", "minLength": "ten"},
        {"enum": 3},
        {"type": "object", "properties": {"item": 5}},
        {"$ref": "#/definitions/missing"},
        pytest.param({"type": "object", "properties": 3}, id="properties-not-an-object"),
        pytest.param({"type": "string", "pattern": "("}, id="pattern-not-a-regex"),
        pytest.param({"type": "array", "items": 5}, id="items-not-a-schema"),
        pytest.param({"type": "string", "maxLength": -1}, id="negative-maxLength"),
        pytest.param({"anyOf": "x"}, id="anyOf-not-a-list"),
    ],
)
def test_an_invalid_json_schema_is_refused_when_declared(schema: dict[str, Any]) -> None:
    domain = Domain("bad")
    with pytest.raises(SchemaError):
        domain.command("POST", "/things", event="ThingAsked", schema=schema)
    with pytest.raises(SchemaError):
        domain.event("ThingDone", schema=schema)


def test_a_topic_rule_matches_its_pattern_and_names_the_parameters() -> None:
    rule = TopicRule("shops/{shop}/orders/{id}", "owner")
    assert rule.match("shops/north/orders/42") == {"shop": "north", "id": "42"}
    assert rule.match("shops/north/orders") is None
    assert rule.match("shops/north/orders/42/lines") is None  # a parameter is one segment
    assert rule.match("shops//orders/42") is None
    assert rule.match("xshops/north/orders/42") is None
    assert TopicRule("news.daily/{day}").match("newsXdaily/monday") is None  # literal text is literal
    assert TopicRule("news.daily/{day}").match("news.daily/monday") == {"day": "monday"}
    assert TopicRule("lobby", "anyone").match("lobby") == {}


def test_a_topic_rule_with_an_unknown_subscribe_rule_is_refused() -> None:
    with pytest.raises(DomainError):
        Domain("bad").topic("things/{id}", subscribe="everyone")  # type: ignore[arg-type]


def test_a_catalog_combines_domains_and_finds_the_rule_of_a_topic() -> None:
    billing = Domain("billing")
    billing.command("POST", "/invoices", event="InvoiceRequested")(noop)
    billing.handler("InvoiceRequested")(nothing)
    billing.topic("invoices/{id}", subscribe="owner")
    billing.event("InvoiceIssued")
    catalog = Catalog.of([orders, billing])
    assert [c.event_type for c in catalog.commands] == ["OrderPlaced", "InvoiceRequested"]
    assert set(catalog.handlers) == {"OrderPlaced", "InvoiceRequested"}
    assert set(catalog.events) == {"OrderConfirmed", "InvoiceIssued"}
    assert [t.pattern for t in catalog.topics] == ["orders/{id}", "invoices/{id}"]
    rule = catalog.topic_rule("invoices/7")
    assert rule is not None and rule.subscribe == "owner"
    assert catalog.topic_rule("receipts/7") is None


def test_a_catalog_refuses_the_same_command_in_two_domains() -> None:
    copy = Domain("copy")
    copy.command("POST", "/shops/{shop}/orders", event="OrderCopied")(noop)
    with pytest.raises(DomainError, match="'orders' and 'copy'"):
        Catalog.of([orders, copy])


def test_a_catalog_refuses_handlers_of_one_event_type_in_two_domains() -> None:
    copy = Domain("copy")
    copy.handler("OrderPlaced")(nothing)
    with pytest.raises(DomainError, match="OrderPlaced"):
        Catalog.of([orders, copy])


# An app with no domain -----------------------------------------------------------------

async def test_an_app_without_domains_serves_its_own_documents() -> None:
    app = create_app(Settings(secret="s" * 32, log_level="warning"), domains=[])
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herald.test") as client:
            openapi = await client.get("/openapi.json")
            asyncapi = await client.get("/asyncapi.json")
            ready = await client.get("/readyz")
    assert openapi.status_code == 200, openapi.text
    assert "/operations/{operation_id}" in openapi.json()["paths"]
    assert asyncapi.status_code == 200, asyncapi.text
    assert list(asyncapi.json()["channels"]) == ["operations"]
    assert ready.status_code == 200


# The orders domain, served -------------------------------------------------------------

async def test_an_order_is_accepted_handled_by_the_embedded_worker_and_redirects_to_the_order(shop: Herald) -> None:
    response = await shop.client.post("/shops/north/orders", json={"item": "tea", "qty": 2})
    assert response.status_code == 202, response.text
    op_id = response.json()["id"]
    assert response.headers["location"] == f"/operations/{op_id}"
    doc = await shop.wait_status(op_id, "succeeded")
    assert doc["result"] == {"id": op_id, "shop": "north", "item": "tea", "qty": 2}
    redirect = await shop.client.get(f"/operations/{op_id}")
    assert redirect.status_code == 303
    assert redirect.headers["location"] == f"/orders/{op_id}"
    order = await shop.client.get(redirect.headers["location"])
    assert order.status_code == 200
    assert order.json() == doc["result"]
    events = (await shop.broker.read(f"orders/{op_id}", None)).events
    assert [stored.event.type for stored in events] == ["OrderConfirmed"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"qty": 2}, "item"),
        ({"item": "tea"}, "qty"),
        ({"item": "tea", "qty": "two"}, "qty"),
        ({"item": "tea", "qty": 0}, "qty"),
        ({"item": "", "qty": 1}, "item"),
        ({"item": "tea", "qty": 1, "colour": "red"}, "colour"),
        ({"item": "tea", "qty": 1, "shipping": {}}, "shipping.city"),
        ({"item": "tea", "qty": 1, "shipping": {"city": 7}}, "shipping.city"),
        ({"item": "tea", "qty": 1, "shipping": "home"}, "shipping"),
    ],
)
async def test_a_body_against_the_schema_is_a_422_naming_the_field(
    shop: Herald, body: dict[str, Any], field: str
) -> None:
    response = await shop.client.post("/shops/north/orders", json=body)
    doc = assert_problem(response, 422, "invalid-command")
    assert doc["field"] == field
    assert field in doc["detail"]


async def test_a_body_that_is_not_an_object_is_a_422_about_the_body(shop: Herald) -> None:
    doc = assert_problem(await shop.client.post("/shops/north/orders", json=["tea"]), 422, "invalid-command")
    assert doc["field"] is None


async def test_an_x_problem_gives_a_rule_its_own_problem_type(shop: Herald) -> None:
    response = await shop.client.post("/shops/north/orders", json={"item": "tea", "qty": 1, "note": "x" * 11})
    doc = assert_problem(response, 422, "too-long")
    assert doc["title"] == "Note too long"
    assert doc["field"] == "note"
    assert doc["max_length"] == 10


async def test_a_command_function_raising_a_problem_is_answered_with_it(shop: Herald) -> None:
    response = await shop.client.post("/shops/west/orders", json={"item": "tea", "qty": 1})
    doc = assert_problem(response, 404, "no-such-shop")
    assert "west" in doc["detail"]


async def test_openapi_lists_the_command_with_its_public_schema_and_the_read_route(shop: Herald) -> None:
    doc = (await shop.client.get("/openapi.json")).json()
    post = doc["paths"]["/shops/{shop}/orders"]["post"]
    assert post["summary"] == "Place an order in a shop."
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    public = {**ORDER_SCHEMA, "properties": {**ORDER_SCHEMA["properties"],
                                             "note": {"type": "string", "maxLength": 10}}}
    assert body_schema == public
    assert "x-problem" not in str(doc)
    assert [p["name"] for p in post["parameters"] if p["in"] == "path"] == ["shop"]
    assert "202" in post["responses"] and "422" in post["responses"]
    read = doc["paths"]["/orders/{id}"]["get"]
    assert read["summary"] == "One order, as the worker stored it."
    assert "post" not in doc["paths"]["/orders/{id}"]
    assert not any(path.startswith("/chats") for path in doc["paths"])
    assert_refs_resolve(doc)


HERALD_EVENTS = ["herald.operation.succeeded", "herald.operation.failed", "herald.operation.canceled",
                 "herald.operation.progress", "herald.gap", "herald.disconnect"]


async def test_asyncapi_describes_every_topic_and_event_type_and_its_refs_resolve(shop: Herald) -> None:
    doc = (await shop.client.get("/asyncapi.json")).json()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    channels = doc["channels"]
    addresses = {channel["address"]: channel_id for channel_id, channel in channels.items()}
    assert set(addresses) == {"operations/{operation_id}", "orders/{id}"}
    for channel in channels.values():  # every parameter of an address is declared, and only those
        assert set(channel.get("parameters", {})) == set(_params(channel["address"]))
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert {"OrderConfirmed", *HERALD_EVENTS} <= names
    assert not any("Chat" in name for name in names)
    confirmed = next(m for m in doc["components"]["messages"].values() if m["name"] == "OrderConfirmed")
    assert confirmed["payload"]["properties"]["data"] == CONFIRMED_SCHEMA
    orders_channel = channels[addresses["orders/{id}"]]
    in_orders = {resolve(doc, ref["$ref"])["name"] for ref in orders_channel["messages"].values()}
    assert "OrderConfirmed" in in_orders
    in_operations = {resolve(doc, ref["$ref"])["name"] for ref in channels[addresses["operations/{operation_id}"]]
                     ["messages"].values()}
    assert {"OrderConfirmed", *HERALD_EVENTS} <= in_operations
    operations = doc["operations"]
    assert {op["channel"]["$ref"] for op in operations.values()} == {f"#/channels/{c}" for c in channels}
    for op in operations.values():
        assert op["action"] in ("send", "receive")
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:  # AsyncAPI 3: an operation's messages are its channel's
            assert message["$ref"].startswith(channel_ref + "/messages/"), message
    assert_refs_resolve(doc)


# A small JSON Reference resolver -------------------------------------------------------

def _params(address: str) -> list[str]:
    return [part[1:-1] for part in address.split("/") if part.startswith("{") and part.endswith("}")]


def resolve(doc: Any, ref: str) -> Any:
    """The value ``ref`` (a local JSON Pointer, ``#/a/b``) points at in ``doc``; ``KeyError`` if nothing."""
    assert ref.startswith("#/"), f"{ref} is not a reference inside the document"
    node = doc
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise KeyError(f"{ref}: no {token!r}")
    return node


def refs_in(node: Any) -> list[str]:
    """Every ``$ref`` in ``node``, at any depth."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in refs_in(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs_in(value)]
    return []


def assert_refs_resolve(doc: dict[str, Any]) -> None:
    """Every ``$ref`` in ``doc`` points at something inside it."""
    refs = refs_in(doc)
    assert refs, "a document without references proves nothing here"
    unresolved = []
    for ref in refs:
        try:
            resolve(doc, ref)
        except (KeyError, IndexError, ValueError):
            unresolved.append(ref)
    assert unresolved == []


def test_the_resolver_finds_what_is_there_and_refuses_what_is_not() -> None:
    doc = {"a": {"b/c": [{"x": 1}]}, "ref": {"$ref": "#/a/b~1c/0"}}
    assert resolve(doc, "#/a/b~1c/0") == {"x": 1}
    assert refs_in(doc) == ["#/a/b~1c/0"]
    assert_refs_resolve(doc)
    with pytest.raises(AssertionError):
        assert_refs_resolve({"ref": {"$ref": "#/missing"}})
    with pytest.raises(AssertionError):
        resolve(doc, "other.json#/a")
