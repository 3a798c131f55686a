"""Issue 4, SVC across the relay fabric: a layered stream thinned on a *remote* node.

Chromium (`livekit-client`) publishes one VP9 or AV1 `L3T3_KEY` stream on node A of a three-node
cluster; two Python SDK subscribers on node C ask for the low and the high quality. The stream
crosses the A → C relay link whole (one RTP stream, one flow) and node C drops the spatial
layers above what each subscriber asked for, exactly as node A would for its own subscribers.

For VP9 the layers are in the payload descriptor, which crosses the link with the payload. For
AV1 they are in the dependency descriptor, an RTP header *extension*: the relay datagram
carries it next to the payload (relay flag 32), and node C reads the template structure from
it and forwards it to its subscribers. Before that, node C could not thin AV1 at all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import pytest

from quality_tools import Browser, SubProc
from test_fabric import cluster3  # noqa: F401 - pytest fixture, used by name
from test_quality import camera_clip, page_base  # noqa: F401 - fixtures, used by name
from test_svc import S0, S2, _kbps, start_low_high, start_svc_publisher


@pytest.mark.timeout(300)
@pytest.mark.parametrize("codec", ["vp9", "av1"])
async def test_svc_layers_dropped_on_a_remote_node(cluster3, page_base, camera_clip, results, codec):
    a_node, _b_node, c_node = cluster3.nodes
    room = f"svc-fabric-{codec}"
    browser: Optional[Browser] = None
    low, high = SubProc("svc-remote-low"), SubProc("svc-remote-high")
    try:
        browser = await start_svc_publisher(a_node, page_base, camera_clip, room, codec)
        await start_low_high(low, high, c_node.ws_url, room, 40, 60)
        t = time.monotonic()
        await asyncio.sleep(4)
        lo_kbps, hi_kbps = _kbps(low, t), _kbps(high, t)
        # Node C relayed in from A (the link exists and carried the stream).
        relayed = c_node.metric("arbor_relay_datagrams_received_total")
        for s in (low, high):
            print(s.describe(6))
        results(
            f"svc-fabric/{codec}: publisher on A, subscribers on C: low {S0[0]}x{S0[1]} {lo_kbps} kbit/s, "
            f"high {S2[0]}x{S2[1]} {hi_kbps} kbit/s; {low.last['readable']}/{low.last['frames']} and "
            f"{high.last['readable']}/{high.last['frames']} readable; node C relay datagrams received {relayed:.0f}"
        )
        assert relayed > 0, "node C received nothing over the relay link"
        for s in (low, high):
            assert s.last["readable"] >= 30, f"{s.label}: only {s.last['readable']} readable frames"
            assert s.last["unreadable"] == 0, f"{s.label}: corrupt frames {s.unreadable()[:6]}"
        assert lo_kbps is not None and hi_kbps is not None, "no byte counters"
        assert lo_kbps < 0.6 * hi_kbps, f"node C did not thin the low subscriber: {lo_kbps} vs {hi_kbps} kbit/s"
    finally:
        await low.close()
        await high.close()
        if browser:
            await browser.close()
