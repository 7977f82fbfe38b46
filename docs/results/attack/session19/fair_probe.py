"""review18 F6: alice defines a slice of 30000 ``tril`` ops with distinct diagonals (~15 CPU s of validation here;
stopped by her default --slice-cpu-s 10); 1 s later bob, another tenant, defines a 3-op slice. Prints how long bob's
DefineSlice took (wall, from its send to its answer) and alice's answer and time. Raw grpc client, the project's
protos; the server a ``coinfer-edge serve`` subprocess with default budgets (``--auth-tokens``, ``--threads 1``).

    PROBE_ROOT=DIR python docs/results/attack/session19/fair_probe.py [N_OPS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from edge_server.attacks import serve_subprocess
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import ALICE, BOB, _define, tril_chain


def main(n: int) -> None:
    path = os.path.join(tempfile.mkdtemp(), "tokens.json")
    Path(path).write_text(json.dumps({"tenants": {"alice": {"token": ALICE}, "bob": {"token": BOB}}}))
    root = os.environ.get("PROBE_ROOT") or None
    proc, addr = serve_subprocess("--auth-tokens", path, "--threads", "1", root=root)
    try:
        with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pbg.EdgeServiceStub(ch)
            big = tril_chain(n)
            res: dict = {}
            th = threading.Thread(target=lambda: res.update(a=_define(stub, ALICE, big, timeout=300)[0]))
            th.start()
            time.sleep(1.0)
            (bob, t_bob), = _define(stub, BOB, tril_chain(3), timeout=300)
            alive = th.is_alive()
            th.join()
            alice, t_alice = res["a"]
            what = ("defined" if alice.HasField("slice_defined") else
                    f"rejected code {alice.slice_rejected.code}: {alice.slice_rejected.message[:100]}")
            print(f"{root or 'this checkout'}: bob's 3-op slice {'defined' if bob.HasField('slice_defined') else 'NOT'}"
                  f" in {t_bob:.2f} s (alice's still validating then: {alive}); alice's {n}-op slice {what} after "
                  f"{t_alice:.1f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30000)
