#!/bin/sh
# UE container entrypoint (docker-compose.yml, service `ue`): shape this container's own uplink, then run
# the UE client against the edge server and write its results to /results/ue-$HOSTNAME.json.
#
# Environment:
#   SERVER        edge address (default edge:50051)
#   MODEL         model spec for coinfer-ue (required), POLICY (default auto), REQUESTS (default 10)
#   UPLINK_MBPS   uplink rate in Mbit/s of TCP goodput (empty/0: unshaped)
#   RTT_MS        round-trip delay in ms (default 0)
#   SHAPE_DEV     interface to shape (default eth0); RESULTS_DIR (default /results)
#   UE_ARGS       extra arguments for `coinfer-ue run`; COINFER_UE (default coinfer-ue)
#   TOKENS_DIR    directory of bearer tokens (<tenant>.token): this UE claims the first one no other UE
#                 claimed (mkdir <file>.claimed is atomic) and runs as that tenant (COINFER_TOKEN)
#   TLS_CA        PEM of the CA that signed the edge's certificate: connect with TLS
#
# Rate: tc tbf on the egress of SHAPE_DEV (needs cap NET_ADMIN). Delay: netem on the same egress (the
# whole RTT: every packet leaving the UE, data and ACKs, waits RTT_MS) where the kernel has netem;
# otherwise (or when tc is not permitted at all) the userspace relay `python -m testbed.linkemu` runs on
# 127.0.0.1 in this container and adds what tc could not, and the client connects through it.
set -eu

SERVER="${SERVER:-edge:50051}"
: "${MODEL:?MODEL must be set (e.g. torchvision:resnet18)}"
POLICY="${POLICY:-auto}"
REQUESTS="${REQUESTS:-10}"
UPLINK_MBPS="${UPLINK_MBPS:-0}"
RTT_MS="${RTT_MS:-0}"
SHAPE_DEV="${SHAPE_DEV:-eth0}"
RESULTS_DIR="${RESULTS_DIR:-/results}"
COINFER_UE="${COINFER_UE:-coinfer-ue}"
UE_ARGS="${UE_ARGS:-}"
HOSTNAME="${HOSTNAME:-$(hostname)}"

log() { echo "ue-entrypoint: $*" >&2; }
positive() { awk -v x="$1" 'BEGIN { exit !(x + 0 > 0) }'; }

if [ -n "${TOKENS_DIR:-}" ]; then
    claimed=""
    for f in "$TOKENS_DIR"/*.token; do
        [ -f "$f" ] || continue
        if mkdir "$f.claimed" 2>/dev/null; then
            claimed="$f"
            break
        fi
    done
    if [ -z "$claimed" ]; then
        log "no unclaimed token in $TOKENS_DIR (more UEs than tokens?)"
        exit 1
    fi
    COINFER_TOKEN=$(cat "$claimed")
    export COINFER_TOKEN
    log "tenant $(basename "$claimed" .token) (bearer token from $claimed)"
fi

relay_rate=""   # what the relay must add (empty: nothing)
relay_rtt=0
tc_parent="root"

if tc qdisc replace dev "$SHAPE_DEV" root pfifo 2>/dev/null; then
    tc qdisc del dev "$SHAPE_DEV" root 2>/dev/null || true
    if positive "$RTT_MS"; then
        if tc qdisc add dev "$SHAPE_DEV" root handle 1: netem delay "${RTT_MS}ms" limit 100000 2>/dev/null; then
            tc_parent="parent 1: handle 2:"
            log "delay: netem ${RTT_MS} ms on $SHAPE_DEV egress"
        else
            relay_rtt="$RTT_MS"
            log "delay: no netem in this kernel; the userspace relay adds ${RTT_MS} ms"
        fi
    fi
    if positive "$UPLINK_MBPS"; then
        # tbf counts frames: scale so UPLINK_MBPS is TCP goodput (1448 payload bytes per 1514-byte frame);
        # burst: 4 ms of data, at least 4 frames.
        rate_kbit=$(awk -v m="$UPLINK_MBPS" 'BEGIN { printf "%d", m * 1000 * 1514 / 1448 }')
        burst=$(awk -v m="$UPLINK_MBPS" 'BEGIN { b = m * 1e6 / 8 * 0.004; if (b < 6056) b = 6056; printf "%d", b }')
        # shellcheck disable=SC2086  # tc_parent is deliberately split into words
        tc qdisc add dev "$SHAPE_DEV" $tc_parent tbf rate "${rate_kbit}kbit" burst "$burst" latency 50ms
        log "rate: tbf ${UPLINK_MBPS} Mbit/s goodput on $SHAPE_DEV egress"
    fi
else
    log "tc not permitted on $SHAPE_DEV (cap NET_ADMIN missing?): the userspace relay shapes rate and delay"
    positive "$UPLINK_MBPS" && relay_rate="$UPLINK_MBPS"
    relay_rtt="$RTT_MS"
fi

target="$SERVER"
relay_pid=""
if [ -n "$relay_rate" ] || positive "$relay_rtt"; then
    relay_out=$(mktemp)
    python -m testbed.linkemu --listen 127.0.0.1:0 --target "$SERVER" \
        --uplink-mbps "${relay_rate:-none}" --rtt-ms "$relay_rtt" >"$relay_out" &
    relay_pid=$!
    trap 'kill "$relay_pid" 2>/dev/null || true' EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    i=0
    until grep -q '^listening on ' "$relay_out"; do
        i=$((i + 1))
        if [ "$i" -gt 100 ] || ! kill -0 "$relay_pid" 2>/dev/null; then
            log "the userspace relay did not start"
            exit 1
        fi
        sleep 0.1
    done
    target=$(sed -n 's/^listening on //p' "$relay_out")
    log "client connects through the relay at $target"
fi

mkdir -p "$RESULTS_DIR"
set -- run --server "$target" --model "$MODEL" --policy "$POLICY" --requests "$REQUESTS" \
    --json "$RESULTS_DIR/ue-$HOSTNAME.json"
if [ -n "${TLS_CA:-}" ]; then
    set -- "$@" --tls-ca "$TLS_CA"
fi
if [ -n "$relay_pid" ]; then
    # the relay carries the gRPC port only: weights in the Session stream, so they see its rate and delay
    set -- "$@" --data-channel off
fi
log "$COINFER_UE $* $UE_ARGS"
if [ -z "$relay_pid" ]; then
    # shellcheck disable=SC2086  # UE_ARGS is a list of words
    exec "$COINFER_UE" "$@" $UE_ARGS
fi
# With the relay alive the shell stays, so it forwards SIGTERM/SIGINT to the client and exits with its status.
set +e
# shellcheck disable=SC2086
"$COINFER_UE" "$@" $UE_ARGS &
ue_pid=$!
trap 'kill -TERM "$ue_pid" 2>/dev/null' TERM INT
wait "$ue_pid"
rc=$?
while kill -0 "$ue_pid" 2>/dev/null; do
    wait "$ue_pid"
    rc=$?
done
exit "$rc"
