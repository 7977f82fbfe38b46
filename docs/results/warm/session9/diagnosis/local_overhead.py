"""CPU per request of a warm remote client whose plans stay local vs the local policy (same process)."""
import sys, time, statistics, subprocess, re, cProfile, pstats, io, os
import torch
torch.set_num_threads(1)
from ue_client.client import prepare_model, CoinferClient
from ue_client.options import LinkOverride
model = sys.argv[1]; policy = sys.argv[2] if len(sys.argv) > 2 else "auto"
srv = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--data-port", "off", "--threads", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
addr = None
for line in srv.stdout:
    m = re.search(r"listening on .*\(port (\d+)", line)
    if m and "data" not in line:
        addr = f"127.0.0.1:{m.group(1)}"; break
try:
    m = prepare_model(f"torchvision:{model}")
    gen = torch.Generator().manual_seed(0)
    x = tuple(torch.randn(t.shape, generator=gen) for t in m.example_inputs)
    link = LinkOverride(uplink_mbps=0.5, rtt_ms=50)
    rem = CoinferClient(m.graph, m.example_inputs, server=addr, policy=policy, link=link)
    loc = CoinferClient(m.graph, m.example_inputs, server=addr, policy="local", link=link)
    def cpu(c, n):
        out = []
        for _ in range(n):
            t = time.process_time(); c(*x); out.append((time.process_time() - t) * 1e3)
        return out
    for c in (rem, loc):
        cpu(c, 3)
    print("remote plan:", rem.last_report.policy, len(rem.last_report.server_ops or ()), "server ops; suspended:",
          getattr(rem.engine.conn, "suspended", None) is not None, "suspensions", rem.engine.suspensions if hasattr(rem.engine, 'suspensions') else '?')
    a, b = [], []
    for i in range(20):
        a += cpu(rem, 1); b += cpu(loc, 1)
    print(f"{policy}: mean {statistics.fmean(a):.2f} median {statistics.median(a):.2f} ms CPU; local: mean {statistics.fmean(b):.2f} median {statistics.median(b):.2f}")
    pr = cProfile.Profile(); pr.enable(); cpu(rem, 20); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
    pr = cProfile.Profile(); pr.enable(); cpu(loc, 20); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(8); print(s.getvalue()[:2500])
    rem.close(); loc.close()
finally:
    os.killpg(srv.pid, 15); srv.wait(10)
