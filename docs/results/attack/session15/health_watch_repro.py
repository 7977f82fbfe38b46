# ruff: noqa  (a results script, kept as it ran)
import json, os, subprocess, sys, time, threading, psutil, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
tok = "/tmp/a15/tokens.json"
json.dump({"tenants": {"alice": {"token": "alice-secret-123"}}}, open(tok, "w"))
p = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--auth-tokens", tok, "--memory-mb", "1024"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
addr = None
for line in p.stdout:
    if line.startswith("listening on"):
        addr = line.split("listening on")[1].split()[0]; break
print("addr", addr)
threading.Thread(target=lambda: [print("SRV", l, end="") for l in p.stdout], daemon=True).start()
proc = psutil.Process(p.pid)
print("rss before MB", proc.memory_info().rss / 2**20)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
chans, calls = [], []
ch = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)])
stub = health_pb2_grpc.HealthStub(ch)
for i in range(N):
    name = (f"{i}-" + "x" * (7 << 20))
    c = stub.Watch(health_pb2.HealthCheckRequest(service=name))
    calls.append(c)
    first = next(c)
time.sleep(2)
print("streams", N, "rss after MB", proc.memory_info().rss / 2**20)
# does the server still serve?
print("check", stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)
for c in calls: c.cancel()
time.sleep(2)
print("rss after cancel MB", proc.memory_info().rss / 2**20)
p.terminate(); p.wait(10)
