"""TLS protocol versions the gRPC port and the data channel accept (attack17): openssl s_client at TLS 1.0-1.3
(client security level 0, so that the refusal is the server's) against coinfer-edge serve with the testbed's
throwaway credentials.

    PYTHONPATH=$PWD python -m testbed.credentials --out /tmp/a17pki --tenants a
    PYTHONPATH=$PWD python docs/results/attack/session17/tls_versions_probe.py [/tmp/a17pki]
"""

import subprocess
import sys

from edge_server.attacks import serve_subprocess


def main() -> None:
    pki = sys.argv[1] if len(sys.argv) > 1 else "/tmp/a17pki"
    proc, addr = serve_subprocess("--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key",
                                  "--auth-tokens", f"{pki}/tokens.json", "--threads", "1")
    data = proc.stdout.readline().split(" on ", 1)[1].strip()
    try:
        for what, a in (("gRPC", addr), ("data channel", data)):
            for v in ("-tls1", "-tls1_1", "-tls1_2", "-tls1_3"):
                cmd = ["openssl", "s_client", "-connect", a, v, "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile",
                       f"{pki}/ca.pem"]
                r = subprocess.run(cmd, input=b"", capture_output=True, timeout=20)
                out = (r.stdout + r.stderr).decode(errors="replace")
                lines = [s.strip() for s in out.splitlines() if s.strip().startswith(("Protocol", "New,"))]
                print(f"{what} {v}: rc {r.returncode}", lines[:2])
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
