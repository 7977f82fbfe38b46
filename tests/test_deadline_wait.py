"""The split request's give-up rule (``ue_client.deadline``) with a real client and a real server, where the UE's own
part outlasts the request's expected time (a loaded UE): the server is not silent then, and the request is answered
by it, not given up the moment the wait begins (session 22's CI: resnet18 requests whose UE part took 1.4-5.5 s on a
~2x slow host fell back 2-10 ms into their wait, 'no progress for 1000 ms after the expected 1401 ms').

The answer must still be on its way when the wait begins (else the request is done before it): the client reaches
the server through a link emulator with a long round trip its planning does not know of, so the answer comes
``RTT_MS`` after the cut tensor left, ``UE_DELAY_S`` of it spent in the UE part and the rest in the wait."""

from __future__ import annotations

import time

from modelgraph import zoo
from ue_client import CoinferClient, deadline, new_tenant
from ue_client import request as req
from ue_client.cli_run import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
UE_DELAY_S = 1.3
"""Added to the UE part of the tested request, after its cut tensor left: past its expected time and the 1 s stall
floor together."""
RTT_MS = 1800.0
"""The emulated link's round trip: the answer comes ~0.5 s into the wait, inside its stall window."""


def test_a_ue_part_past_the_expected_time_is_not_a_silent_server(server, monkeypatch):
    from testbed.linkemu import LinkEmulatorThread

    with LinkEmulatorThread("127.0.0.1", server.port, uplink_mbps=1000, rtt_ms=FAST["rtt_ms"]) as emu, \
            CoinferClient(zoo.spec("chain"), server=f"127.0.0.1:{emu.port}", tenant=new_tenant(), policy="offload",
                          server_ops=3, link=FAST, fallback=False, profile_runs=2, probe=False,
                          data_channel=False) as c:
        x = c.example_inputs
        c(*x)  # cold, under the tests' patient rule: the slice and its weights go up
        emu.set_link(rtt_ms=RTT_MS)  # the long round trip from here (the cold request's ~10 round trips at 1.8 s: 15 s)
        monkeypatch.setattr(req, "patience_of", deadline.patience_of)  # the library's rule from here
        rules = []
        orig_prefix, orig_rule = req.local.run_prefix, req.patience_of

        def slow_prefix(*a, **k):  # the UE part, then a loaded UE's delay (no byte of the request is late)
            out = orig_prefix(*a, **k)
            time.sleep(UE_DELAY_S)
            return out

        def recorded(*a, **k):
            rules.append(orig_rule(*a, **k))
            return rules[-1]

        monkeypatch.setattr(req.local, "run_prefix", slow_prefix)
        monkeypatch.setattr(req, "patience_of", recorded)
        y = c(*x)  # fallback=False: a give-up raises DeadlineExceeded
        rep = c.last_report
        assert rules and rules[-1].expected_s + rules[-1].stall_s < UE_DELAY_S, rules  # past both: given up before
        assert not rep.fallback and rep.server_ops > 0, rep.fallback_reason
        assert max_abs_diff(y, c.reference(*x)) == 0.0
        assert rep.measured_ms >= RTT_MS
        emu.set_link(rtt_ms=FAST["rtt_ms"])  # the client's close at the fast round trip
