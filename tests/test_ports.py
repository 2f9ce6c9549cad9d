"""`free_port`: ports below the kernel's ephemeral range, one block per xdist worker, held ports skipped.

The CI failure this guards against: `bind(0)` returned an ephemeral port, a client socket elsewhere took it as
its source port before `rentalml serve` bound it, and uvicorn exited with "address already in use".
"""

from __future__ import annotations

import socket

from rentalml import services
from rentalml.services import PORT_FLOOR, _ephemeral_low, free_port, port_block


def test_blocks_lie_below_the_ephemeral_range_and_workers_do_not_share_one():
    low = 32768
    blocks = [port_block(f"gw{i}", low) for i in range(4)]
    assert all(PORT_FLOOR <= lo < hi <= low for lo, hi in blocks)
    for i, (lo_a, hi_a) in enumerate(blocks):
        for lo_b, hi_b in blocks[i + 1:]:
            assert hi_a <= lo_b or hi_b <= lo_a, blocks
    assert port_block("", low) == (PORT_FLOOR, low)  # outside xdist: the whole room below the range
    assert port_block("gw0", PORT_FLOOR + 10) is None  # no room: free_port falls back to bind(0)


def test_free_port_is_outside_the_ephemeral_range_and_calls_differ():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    lo, hi = port_block()
    assert all(lo <= p < hi for p in ports) and hi <= _ephemeral_low()


def test_a_port_someone_listens_on_is_skipped():
    lo, hi = port_block()
    nxt = free_port() + 1  # the cursor now points at this port
    if nxt >= hi:
        nxt = lo
    with socket.socket() as held:
        held.bind(("127.0.0.1", nxt))
        held.listen()
        assert free_port() != nxt


def test_no_room_below_the_range_falls_back_to_the_kernel(monkeypatch):
    monkeypatch.setattr(services, "_ephemeral_low", lambda *a: PORT_FLOOR + 10)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when returned
