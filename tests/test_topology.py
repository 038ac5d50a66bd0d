"""One topology, three ways to get it onto a broker (definitions.json, ``fedq broker apply``, ``declare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedq.broker import Management, apply, q
from fedq.errors import ConfigError
from fedq.topology import Names, definitions, namespace_of
from fedq.transport import connect

BROKER_CONFIG = Path(__file__).resolve().parent.parent / "broker_config"


def test_definitions_json_is_generated_from_the_function() -> None:
    assert json.loads((BROKER_CONFIG / "definitions.json").read_text()) == definitions(Names(), 1)


def test_quorum_variant_is_generated_from_the_function() -> None:
    expected = definitions(Names(), 1, quorum=True)
    assert json.loads((BROKER_CONFIG / "definitions.quorum.json").read_text()) == expected


def test_update_queues_push_back_and_dead_letter() -> None:
    spec = definitions(Names("a"), 3, max_queue_bytes=1000)
    updates = [x for x in spec["queues"] if ".updates." in x["name"]]
    assert [x["name"] for x in updates] == ["a.updates.shard.0", "a.updates.shard.1", "a.updates.shard.2"]
    for queue in updates:
        assert queue["arguments"]["x-max-length-bytes"] == 1000
        assert queue["arguments"]["x-overflow"] == "reject-publish"
        assert queue["arguments"]["x-dead-letter-exchange"] == "a.dlx"
    streams = {x["name"] for x in spec["queues"] if x["arguments"]["x-queue-type"] == "stream"}
    assert streams == {"a.models", "a.versions"}


def test_namespace_of_every_queue() -> None:
    spec = definitions(Names("ns-1"), 2)
    assert {namespace_of(x["name"]) for x in spec["queues"]} == {"ns-1"}
    with pytest.raises(ConfigError):
        namespace_of("amq.gen-123")


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        definitions(Names("a"), 0)
    with pytest.raises(ConfigError):
        definitions(Names("a.b"), 1)


def _reported(management: Management, vhost: str, ns: str) -> dict[str, Any]:
    """What the broker says exists under ``ns``, in the shape of ``definitions``'s lists."""
    exchanges = [
        {k: x[k] for k in ("name", "type", "durable", "auto_delete", "internal", "arguments")}
        for x in management.get(f"/exchanges/{q(vhost)}")
        if x["name"].startswith(ns + ".")
    ]
    queues = [
        {k: x[k] for k in ("name", "durable", "auto_delete", "arguments")}
        for x in management.get(f"/queues/{q(vhost)}")
        if x["name"].startswith(ns + ".")
    ]
    bindings = [
        {k: x[k] for k in ("source", "destination", "destination_type", "routing_key", "arguments")}
        for x in management.get(f"/bindings/{q(vhost)}")
        if x["source"].startswith(ns + ".")
    ]
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def _expected(names: Names, shards: int, vhost: str, **options: Any) -> dict[str, Any]:
    spec = definitions(names, shards, vhost=vhost, **options)
    return {
        kind: [{k: v for k, v in x.items() if k != "vhost"} for x in spec[kind]] for kind in _reported_kinds()
    }


def _reported_kinds() -> tuple[str, ...]:
    return ("exchanges", "queues", "bindings")


def _sorted(spec: dict[str, Any]) -> dict[str, Any]:
    return {kind: sorted(spec[kind], key=lambda x: json.dumps(x, sort_keys=True)) for kind in spec}


@pytest.mark.broker
@pytest.mark.parametrize("quorum", [False, True])
def test_declare_creates_exactly_the_definitions(
    amqp_url: str, management: Management, vhost: str, names: Names, quorum: bool
) -> None:
    with connect(amqp_url) as transport:
        transport.declare(names, 2, quorum=quorum)
    assert _sorted(_reported(management, vhost, names.namespace)) == _sorted(
        _expected(names, 2, vhost, quorum=quorum)
    )


@pytest.mark.broker
def test_applied_definitions_are_what_declare_expects(
    amqp_url: str, management: Management, vhost: str, names: Names
) -> None:
    apply(management, definitions(names, 2, vhost=vhost))
    assert _sorted(_reported(management, vhost, names.namespace)) == _sorted(_expected(names, 2, vhost))
    with connect(amqp_url) as transport:
        transport.declare(names, 2)  # equivalent arguments: no PRECONDITION_FAILED
        transport.publish(names.updates_exchange, names.shard_key(1), b"routed")
        transport.flush()
    queue = management.get(f"/queues/{q(vhost)}/{q(names.updates_queue(1))}")
    assert queue["arguments"] == definitions(names, 2)["queues"][2]["arguments"]
