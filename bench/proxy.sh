#!/usr/bin/env bash
# Benchmark: the dev-server proxy against baselines measured in the same run,
# on the container backend.
#
# Upstream: Caddy (the host's static binary, copied in) answering a fixed
# 1 KiB body on 127.0.0.1:9000 inside a sandbox.
#  1. added latency: wrk, one connection, keep-alive; p50/p99 through
#     keystone's proxy (http://bench.sandbox.localhost:PORT) vs a direct
#     connection to the same upstream from inside the sandbox's network
#     namespace (nsenter; no proxy, no SSH);
#  2. throughput: wrk, 32 connections, through keystone's proxy vs Caddy on
#     the host configured as the same reverse proxy: routing by Host to the
#     same upstream over the same sandbox's SSH channel (an OpenSSH
#     ControlMaster forward to a Unix socket, Caddy's `unix//` upstream).
#
# Prints absolute figures and ratios. Not a test: nothing here fails on time.
#   sudo ./bench/proxy.sh [SECONDS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
D=${1:-5}
bench_require wrk:wrk caddy:caddy nsenter:util-linux curl:curl python3:python3 bc:bc
[ "$(id -u)" -eq 0 ] || { echo "run as root (nsenter into the sandbox's network namespace)" >&2; exit 4; }
bench_build
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PROXY=$(port)
CADDY=$(port)
caddy_pid=
bench_project bench container "" "[proxy]\nenable = true\nport = $PROXY\n"
bench_at_exit '[ -z "$caddy_pid" ] || kill "$caddy_pid" 2>/dev/null'
$K agent start --no-attach >/dev/null 2>&1

# The upstream, inside the sandbox.
body=$(head -c 1024 /dev/zero | tr '\0' x)
$K agent exec --user root -- sh -c 'cat > /usr/local/bin/caddy && chmod 755 /usr/local/bin/caddy' < "$(command -v caddy)"
printf '{\n  admin off\n  auto_https off\n}\n:9000 {\n  bind 127.0.0.1\n  respond "%s" 200\n}\n' "$body" > "$work/up.caddyfile"
$K agent exec -- sh -c 'cat > /tmp/ks-bench-upstream.caddyfile' < "$work/up.caddyfile"
$K agent exec -- sh -c 'cd /workspace && (setsid nohup caddy run --adapter caddyfile --config /tmp/ks-bench-upstream.caddyfile >/tmp/up.log 2>&1 < /dev/null &)'
host=bench.sandbox.localhost
for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$host:$PROXY/")" = 200 ] && break
    sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$host:$PROXY/")" = 200 ] || { echo "the upstream never answered through the proxy" >&2; exit 3; }

# The sandbox's network namespace, for the direct baseline.
up_pid=$(pgrep -f 'caddy run --adapter caddyfile --config /tmp/ks-bench-upstream' | head -1)
netns=/proc/$up_pid/ns/net

# Caddy on the host as the same reverse proxy, over the same SSH channel.
cfg=$XDG_STATE_HOME/keystone/sandboxes/bench/ssh/config
ssh -F "$cfg" -l root keystone-bench true
ssh -F "$cfg" -l root -O forward -L "$work/fwd.sock:127.0.0.1:9000" keystone-bench 2>/dev/null
printf '{\n  admin off\n  auto_https off\n}\nhttp://%s:%s {\n  bind 127.0.0.1\n  reverse_proxy unix/%s\n}\n' "$host" "$CADDY" "$work/fwd.sock" > "$work/host.caddyfile"
caddy run --adapter caddyfile --config "$work/host.caddyfile" >"$work/caddy.log" 2>&1 &
caddy_pid=$!
for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$host:$CADDY/")" = 200 ] && break
    sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$host:$CADDY/")" = 200 ] || { echo "caddy never answered; $(tail -3 "$work/caddy.log")" >&2; exit 3; }

# wrk --latency: "50%  123.00us" lines; print microseconds.
pct() { awk -v p="$1%" '$1 == p { v=$2; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else {sub(/s/,"",v); print v*1000000} }'; }
rps() { awk '/^Requests\/sec:/ {print $2}'; }
lat() { wrk -t1 -c1 -d"${D}s" --latency -H "Host: $host" "$1" 2>&1; }
tput() { wrk -t2 -c32 -d"${D}s" -H "Host: $host" "$1" 2>&1; }

direct=$(nsenter --net="$netns" wrk -t1 -c1 -d"${D}s" --latency http://127.0.0.1:9000/ 2>&1)
viaks=$(lat "http://127.0.0.1:$PROXY/")
viacaddy=$(lat "http://127.0.0.1:$CADDY/")
t_ks=$(tput "http://127.0.0.1:$PROXY/" | rps)
t_caddy=$(tput "http://127.0.0.1:$CADDY/" | rps)
t_direct=$(nsenter --net="$netns" wrk -t2 -c32 -d"${D}s" http://127.0.0.1:9000/ 2>&1 | rps)

d50=$(pct 50 <<<"$direct"); d99=$(pct 99 <<<"$direct")
k50=$(pct 50 <<<"$viaks"); k99=$(pct 99 <<<"$viaks")
c50=$(pct 50 <<<"$viacaddy"); c99=$(pct 99 <<<"$viacaddy")
echo "latency, 1 connection, ${D}s each (microseconds):"
echo "  direct (sandbox netns):  p50 $d50  p99 $d99"
echo "  keystone proxy:          p50 $k50  p99 $k99   added p50 $(calc "$k50 - $d50") us, p99 $(calc "$k99 - $d99") us"
echo "  caddy + ssh forward:     p50 $c50  p99 $c99   added p50 $(calc "$c50 - $d50") us, p99 $(calc "$c99 - $d99") us"
echo "throughput, 32 connections, ${D}s each (requests/s):"
echo "  direct $t_direct, keystone proxy $t_ks, caddy + ssh forward $t_caddy"
echo "  ratio keystone/caddy $(ratio "$t_ks" "$t_caddy")x   (keystone/direct $(ratio "$t_ks" "$t_direct")x)"
