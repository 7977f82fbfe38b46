#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session21/run_collude.sh BEFORE_ROOT NOW_ROOT > docs/results/attack/session21/collude.txt
# BEFORE_ROOT: git archive efe7732^ (session 21's start); NOW_ROOT: git archive of the commit named in the output
# (each with the venv linked as .venv). Ran as /tmp/b21before and /tmp/b21snap (bb031ab).
P=$PWD/docs/results/attack/session21/collude_probe.py
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
echo "## before (efe7732^, session 21's start)"
cd "$1" && PYTHONPATH="$1" timeout 200 .venv/bin/python "$P" --after 1 6
echo "## now ($(git -C "$2" rev-parse --short HEAD 2>/dev/null || cat "$2/REV"))"
cd "$2" && PYTHONPATH="$2" timeout 200 .venv/bin/python "$P" --after 1 6
echo "# end $(date -u +%H:%M)"
