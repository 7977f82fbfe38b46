"""`python -m testbed.demo` (`make demo`): one UE, one edge server, an emulated 20 Mbps / 40 ms link.

Starts ``coinfer-edge serve --port 0`` as a subprocess and puts the userspace link emulator in front of
it (a userspace-mode ``testbed.launcher.Testbed``: the same launcher the benchmarks use), then runs
resnet18 in this process for a stream of requests with policy ``auto`` (mjoa + progressive offloading):
the first requests run locally while the server part's weights stream in the background, later ones
are offloaded once the server holds what they need. Every result is checked against local execution.
The server (SIGTERM) and the emulator are stopped whatever happens; the server's log is
``<workdir>/server.log``.

The UE is emulated as a device ``--ue-slowdown`` times slower than this CPU (the edge server runs at
full speed), since both run on one machine here. It lives in the testbed, not in ``ue_client``: the
runtimes import no testbed code (DESIGN.md §2).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--policy", default="auto")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--interval-ms", type=float, default=2000.0)
    p.add_argument("--uplink-mbps", type=float, default=20.0)
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--ue-slowdown", type=float, default=10.0)
    p.add_argument("--ue-threads", type=int, default=1)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads of the edge server (1: stable on a shared 2-core machine)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the server's log goes (default: a temporary directory, removed at the end)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from testbed.launcher import Testbed
    from ue_client.cli_run import HEADER, format_row, max_abs_diff
    from ue_client.client import CoinferClient, new_tenant

    torch.set_num_threads(args.ue_threads)
    print(f"coinfer demo: {args.model}, policy {args.policy}, link {args.uplink_mbps:g} Mbps up / "
          f"{args.rtt_ms:g} ms RTT (userspace emulator), UE {args.ue_slowdown:g}x slower than this CPU", flush=True)
    client = None
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coinfer-demo-")))
        tb = stack.enter_context(Testbed(workdir, mode="userspace", server_threads=args.server_threads))
        tenant = "demo"
        port = tb.start_server(tenants=[tenant])  # TLS + a bearer token for the demo's tenant
        ue = tb.add_ue(args.uplink_mbps, None, args.rtt_ms, cpu=None)
        access = tb.credentials.client_options(tenant) if tb.credentials is not None else {"tenant": new_tenant()}
        try:
            print(f"edge server on 127.0.0.1:{port} (TLS, tenant {tenant!r} with its bearer token; credentials "
                  f"in {tb.credentials.directory if tb.credentials else '-'}), emulated link on {ue.server_address}",
                  flush=True)
            client = CoinferClient(args.model, server=ue.server_address, policy=args.policy,
                                   ue_slowdown=args.ue_slowdown, threads=args.ue_threads, **access)
            g = client.graph
            print(f"{g.name}: {len(g.ops)} ops, {g.total_weight_bytes / 1e6:.1f} MB of weights the server "
                  "does not have yet", flush=True)
            x = client.example_inputs
            ref = client.reference(*x)
            print(HEADER, flush=True)
            for i in range(args.requests):
                if i:
                    time.sleep(args.interval_ms / 1e3)
                y = client(*x)
                rep = client.last_report
                rep.max_abs_diff_vs_local = max_abs_diff(y, ref)
                print(format_row(rep), flush=True)
                if args.verbose:
                    print("     server timings:", rep.server_timings, "needed", rep.needed_upload_bytes, flush=True)
            link = client.link
            print(f"link estimate: uplink {link.uplink_mbps:.1f} Mbps, RTT {link.rtt_ms:.1f} ms", flush=True)
            reps = client.reports
            print(f"first request {reps[0].measured_ms:.0f} ms -> last {reps[-1].measured_ms:.0f} ms; "
                  f"every result equal to local execution: "
                  f"{all(r.max_abs_diff_vs_local == 0 for r in reps)}", flush=True)
        finally:
            if client is not None:
                client.close()
    print("server and link emulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
