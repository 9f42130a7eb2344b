import pytest

from wiremesh.core import bus


def test_round_trip_preserves_nested_key_list():
    msg = bus.NodeKeyList(keys=(bus.NodeKeyEvent(node_key="k1", node_id=3, expires_at=10.5),))
    assert bus.decode(bus.NodeKeyList, bus.encode(msg)) == msg


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b'{"node_id": 1, "bogus": 2}', b'{"change": "x"}'])
def test_malformed_messages_raise_value_error(data):
    with pytest.raises(ValueError):
        bus.decode(bus.NodeChanged, data)
