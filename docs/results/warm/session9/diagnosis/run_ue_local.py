import sys, subprocess, json, os
from testbed.cgroups import CpuCgroup
cpu = float(sys.argv[2])
cg = CpuCgroup(f"warm9exp{os.getpid()}", 4.0)
try:
    p = cg.popen([sys.executable, "/tmp/warm9/exp/ue_local2.py", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("CAPTURED"):
            cg.set_cpus(cpu); p.stdin.write("go\n"); p.stdin.flush()
        elif line.startswith("RESULT"):
            r = json.loads(line[7:]); r["cpu"] = cpu
            print(json.dumps(r))
    p.wait()
finally:
    cg.close()
