#!/usr/bin/env bash
# Benchmark: the allowlist egress path (container backend) against the
# open NAT, one run, one lab server:
#
#  1. latency of one small HTTPS request (a fresh curl, so a fresh TCP
#     connection and TLS handshake each time; curl's own %{time_total}
#     inside the guest, so exec/ssh overhead is not in it), p50 and p90;
#  2. throughput of a 100 MiB HTTPS download (%{speed_download}), median of
#     3 per round;
#
# for: A `mode = "open"` (pasta), B `mode = "allowlist"` through the
# explicit proxy (the guest's default HTTPS_PROXY) and B through the
# transparent capture (`--noproxy '*'`: the guest resolves the name with
# keystone's DNS and connects to the synthetic address). Every path sends
# the same request: SNI and Host bench.lab.test (run A pins the name to
# the lab's address with --resolve, as it cannot resolve it).
#
# The lab is a network namespace behind a veth pair on 198.51.100.0/24
# (TEST-NET-2): an HTTPS server (caddy if installed, else python3) with a
# self-signed certificate, and a python3 DNS responder that keystone's
# host-side resolution is pointed at (`[egress] resolver`). The same
# requests from the host itself straight to the lab are printed as the
# floor (what the server and the host's stack alone cost).
#
# Prints absolute figures and ratios. Not a test: nothing here fails on time.
#   sudo ./bench/egress.sh [ITERATIONS [ROUNDS]]     # default 50 requests, 3 rounds
#   (BENCH_EGRESS_NET=A.B.C puts the lab on A.B.C.0/24 instead of 198.51.100.0/24;
#   BENCH_KEYSTONE=PATH measures that keystone binary instead of building this
#   checkout's, so two builds can be compared, interleaved, in one machine state;
#   BENCH_EGRESS_LOG=FILE appends run B's egress daemon log to FILE, e.g. with
#   RUST_LOG=keystone_egress=debug for its per-connection timings)
#
# A round is: the host floor, run A (start, measure, stop), run B (config
# rewritten, start, measure, stop); the rounds' samples are pooled, so
# drift of a shared machine between A and B is spread over both.
#
# The transparent path's time includes the guest's own lookup of the name
# (keystone's DNS, shown as "dns"); the other paths do none (A: --resolve,
# proxy: the proxy resolves it, on the host, as on every path of run B).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-50}                                    # small requests per path and round
ROUNDS=${2:-3}                                # A then B, this many times, pooled
DL=3                                          # 100 MiB downloads per path and round
bench_require curl:curl openssl:openssl python3:python3 ip:iproute2 pasta:passt bc:bc
[ "$(id -u)" = 0 ] || { echo "run as root (it makes a network namespace)" >&2; exit 4; }

# The lab's /24 (first three octets): no route on the host may use it, and
# keystone must not count it special (private, CGNAT, 198.18/15: refused).
NET=${BENCH_EGRESS_NET:-198.51.100}
if ip -4 route show | grep -qF -e "$NET." ; then
    echo "$NET.0/24 is already routed on this host (ip route: $(ip -4 route show | grep -F "$NET." | head -1));" \
        "wait for its user or set BENCH_EGRESS_NET to a free /24" >&2
    exit 4
fi
HOST_IP=$NET.1 LAB_IP=$NET.2 NAME=bench.lab.test

if [ -n "${BENCH_KEYSTONE:-}" ]; then K=$BENCH_KEYSTONE; else bench_build; fi
bench_project bench container '' "[egress]\nmode = \"open\"\n"
cfg=$XDG_CONFIG_HOME/keystone/agent.toml
sdir=$XDG_STATE_HOME/keystone/sandboxes/bench

# --- the lab --------------------------------------------------------------
lab=$work/lab ns=ksb-lab-$$ veth=ksb$$
mkdir -p "$lab/www"
ip netns add "$ns"
bench_at_exit "ip netns del $ns"
ip link add "$veth" type veth peer name eth0 netns "$ns"
bench_at_exit "ip link del $veth 2>/dev/null"
ip addr add "$HOST_IP/24" dev "$veth"
ip link set "$veth" up
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$LAB_IP/24" dev eth0
ip -n "$ns" link set eth0 up

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=$NAME" -addext "subjectAltName=DNS:$NAME" \
    -keyout "$lab/key.pem" -out "$lab/cert.pem" 2>/dev/null
printf 'ok\n' > "$lab/www/small"
BIG=$((100 << 20))
head -c "$BIG" /dev/urandom > "$lab/www/big"

if command -v caddy >/dev/null; then
    server="caddy $(caddy version | cut -d' ' -f1)"
    cat > "$lab/Caddyfile" <<EOF
{
	admin off
	auto_https off
}
https://$NAME:443 {
	tls $lab/cert.pem $lab/key.pem
	root * $lab/www
	file_server
}
EOF
    HOME=$lab XDG_DATA_HOME=$lab/data XDG_CONFIG_HOME=$lab/data \
        ip netns exec "$ns" caddy run --adapter caddyfile --config "$lab/Caddyfile" >"$lab/https.log" 2>&1 &
else
    server="python3 http.server + ssl (threading)"
    cat > "$lab/https.py" <<'EOF'
import http.server, ssl, sys
lab = sys.argv[1]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=lab + "/www", **k)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer((sys.argv[2], 443), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(lab + "/cert.pem", lab + "/key.pem")
s.socket = c.wrap_socket(s.socket, server_side=True)
s.serve_forever()
EOF
    ip netns exec "$ns" python3 "$lab/https.py" "$lab" "$LAB_IP" >"$lab/https.log" 2>&1 &
fi
bench_at_exit "kill $!"

# DNS: NAME → LAB_IP (A), no AAAA, NXDOMAIN for anything else.
cat > "$lab/dns.py" <<'EOF'
import socket, struct, sys
name, ip = sys.argv[1].lower(), socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    i, labels = 12, []
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace")); i += 1 + q[i]
    qend = i + 5
    qtype, = struct.unpack("!H", q[i + 1:i + 3])
    ours = ".".join(labels).lower() == name
    ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + ip if ours and qtype == 1 else b""
    flags = 0x8400 | (q[2] & 1) << 8 | (0 if ours else 3)
    s.sendto(q[:2] + struct.pack("!HHHHH", flags, 1, 1 if ans else 0, 0, 0) + q[12:qend] + ans, peer)
EOF
ip netns exec "$ns" python3 "$lab/dns.py" "$NAME" "$LAB_IP" >"$lab/dns.log" 2>&1 &
bench_at_exit "kill $!"

pin=(--resolve "$NAME:443:$LAB_IP")
timeout 20 bash -c "until curl -sfk ${pin[*]} -o /dev/null https://$NAME/small; do sleep 0.1; done" \
    || { echo "the lab's HTTPS server did not come up:" >&2; cat "$lab/https.log" >&2; exit 1; }
timeout 5 python3 - "$LAB_IP" "$NAME" <<'EOF' || { echo "the lab's DNS responder does not answer" >&2; exit 1; }
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(bytes([len(l)]) + l.encode() for l in sys.argv[2].split(".")) + b"\x00\x00\x01\x00\x01"
for _ in range(40):
    try:
        s.sendto(q, (sys.argv[1], 53)); r = s.recv(512)
        assert r[-4:] == socket.inet_aton(sys.argv[1]), r; break
    except socket.timeout:
        pass
else:
    sys.exit(1)
EOF

# --- measuring --------------------------------------------------------------
# One shell loop, run where it is given (host or guest): 4 discarded
# rounds, then N rounds of one small request per path (interleaved, so
# drift hits every path alike), printing "PATH time_total time_namelookup",
# then DL downloads per path, printing "PATH-dl speed_download".
# Paths are "label curl-args" pairs, '|'-separated.
probe_script='
paths=$1 n=$2 dl=$3 url=$4 big=$5
set -f
# run LABEL CURL-ARGS...: one small request, "LABEL total namelookup"
run() {
    label=$1; shift
    out=$(curl -sk --max-time 10 "$@" -o /dev/null -w "%{time_total} %{time_namelookup} %{http_code}" "$url/small") || out="fail $?"
    case $out in *" 200") [ "$round" -gt 0 ] && echo "$label ${out% *}" ;; *) echo "$label error $out" ;; esac
}
# get LABEL CURL-ARGS...: one download, "LABEL-dl speed"
get() {
    label=$1; shift
    out=$(curl -sk --max-time 120 "$@" -o /dev/null -w "%{speed_download} %{size_download} %{http_code}" "$url/big") || out="fail $?"
    case $out in *" $big 200") echo "$label-dl ${out%% *}" ;; *) echo "$label-dl error $out" ;; esac
}
round=-3
while [ "$round" -le "$n" ]; do
    IFS="|"; for p in $paths; do IFS=" "; run $p; done
    round=$((round + 1))
done
IFS="|"; for p in $paths; do
    IFS=" "; i=0
    while [ "$i" -lt "$dl" ]; do get $p; i=$((i + 1)); done
done
'
probe_timeout=$(( (N + 4) * 2 * 10 + DL * 2 * 120 + 60 ))   # curl --max-time bounds each request

# values LABEL FIELD < results: that column of LABEL's lines
values() { awk -v l="$1" -v f="$2" '$1 == l && $2 != "error" {print $f}'; }
p_of() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; print a[i]}'; }
fmt() { awk -v x="$2" "BEGIN {printf \"$1\", x}"; }
ms_of() { fmt %.2f "$(calc "$1 * 1000" 6)"; }
mib_of() { fmt %.1f "$(calc "$1 / 1048576" 3)"; }
delta() { fmt %+.2f "$(calc "$1 - $2" 3)"; }

# open_config / allow_config: the [egress] table (the file's last) of run A / B.
open_config() {
    sed -i '/^\[egress\]/,$d' "$cfg"
    printf '[egress]\nmode = "open"\n' >> "$cfg"
}
allow_config() {
    sed -i '/^\[egress\]/,$d' "$cfg"
    printf '[egress]\nmode = "allowlist"\npresets = []\nallow = ["%s"]\nresolver = "%s"\n' "$NAME" "$LAB_IP" >> "$cfg"
}
printf '%s' "$probe_script" > "$lab/probe.sh"
: > "$work/all.txt"
for round in $(seq "$ROUNDS"); do
    # The floor: the host itself, straight to the lab.
    timeout "$probe_timeout" sh "$lab/probe.sh" "host ${pin[*]}" "$N" "$DL" "https://$NAME" "$BIG" >> "$work/all.txt"

    # A: open.
    open_config
    timeout 900 "$K" agent start --no-attach >/dev/null 2>&1     # the first may build the image
    timeout 60 "$K" agent exec -- sh -c 'test -z "${HTTPS_PROXY:-}"' \
        || { echo "run A (open) has HTTPS_PROXY set in the guest" >&2; exit 1; }
    timeout "$probe_timeout" "$K" agent exec -- sh -c "$probe_script" probe \
        "open ${pin[*]}" "$N" "$DL" "https://$NAME" "$BIG" >> "$work/all.txt"
    timeout 120 "$K" agent stop >/dev/null

    # B: allowlist, only the lab's name, resolved on the host by the lab's DNS.
    allow_config
    timeout 300 "$K" agent start --no-attach >/dev/null 2>&1
    proxy=$(timeout 60 "$K" agent exec -- sh -c 'echo "${HTTPS_PROXY:-}"')
    [ -n "$proxy" ] || { echo "run B (allowlist) has no HTTPS_PROXY in the guest" >&2; exit 1; }
    # Sanity: the lab's address itself is not reachable from the guest.
    if timeout 60 "$K" agent exec -- curl -sk --max-time 5 --noproxy '*' -o /dev/null "https://$LAB_IP/small"; then
        echo "run B (allowlist) reaches $LAB_IP directly: not the egress path" >&2; exit 1
    fi
    timeout "$probe_timeout" "$K" agent exec -- sh -c "$probe_script" probe \
        "proxy|transparent --noproxy *" "$N" "$DL" "https://$NAME" "$BIG" >> "$work/all.txt"
    timeout 120 "$K" agent stop >/dev/null
done
[ -z "${BENCH_EGRESS_LOG:-}" ] || cat "$sdir/logs/egress.log" >> "$BENCH_EGRESS_LOG" 2>/dev/null || true
decisions=$(python3 -c 'import collections, json, sys
c = collections.Counter((e["proto"], e["decision"]) for e in map(json.loads, open(sys.argv[1])))
print(", ".join(f"{p} {d} {n}" for (p, d), n in sorted(c.items())))' "$sdir/egress/decisions.jsonl")

# --- report -------------------------------------------------------------------
errors=$(grep -c ' error ' "$work/all.txt" || true)
declare -A p50 p90 dns mibs
for path in host open proxy transparent; do
    if [ -z "$(values "$path" 2 < "$work/all.txt")" ] || [ -z "$(values "$path-dl" 2 < "$work/all.txt")" ]; then
        echo "no successful request on the $path path:" >&2
        grep "^$path" "$work/all.txt" | sort | uniq -c | head >&2
        echo "egress log: $(tail -n 5 "$sdir/logs/egress.log" 2>/dev/null)" >&2
        exit 1
    fi
    p50[$path]=$(ms_of "$(values "$path" 2 < "$work/all.txt" | p_of 50)")
    p90[$path]=$(ms_of "$(values "$path" 2 < "$work/all.txt" | p_of 90)")
    dns[$path]=$(ms_of "$(values "$path" 3 < "$work/all.txt" | p_of 50)")
    mibs[$path]=$(mib_of "$(values "$path-dl" 2 < "$work/all.txt" | median)")
done
echo "lab: $server on $LAB_IP ($NAME, self-signed), python3 DNS; proxy in the guest: $proxy"
echo "run B decision log: $decisions"
echo "small HTTPS request, fresh connection, curl time_total in the guest (ms; p50 / p90 of $N x $ROUNDS rounds; p50 of its DNS lookup):"
for path in host open proxy transparent; do
    printf '  %-12s p50 %6s  p90 %6s   dns %s\n' "$path" "${p50[$path]}" "${p90[$path]}" "${dns[$path]}"
done
echo "100 MiB HTTPS download (MiB/s, median of $DL x $ROUNDS rounds; min-max):"
for path in host open proxy transparent; do
    range=$(values "$path-dl" 2 < "$work/all.txt" | sort -n | sed -n '1p;$p' | while read -r v; do mib_of "$v"; echo; done | paste -sd-)
    printf '  %-12s %6s   (%s)\n' "$path" "${mibs[$path]}" "$range"
done
[ "$errors" = 0 ] || echo "failed requests: $errors (see $work/all.txt lines with 'error')"
for path in proxy transparent; do
    echo "added latency, $path vs open: p50 $(delta "${p50[$path]}" "${p50[open]}") ms, p90 $(delta "${p90[$path]}" "${p90[open]}") ms"
done
for path in proxy transparent; do
    echo "throughput, $path vs open: ratio $(fmt %.2f "$(ratio "${mibs[$path]}" "${mibs[open]}")")x"
done
echo "open vs host (the floor): p50 $(delta "${p50[open]}" "${p50[host]}") ms, throughput ratio $(fmt %.2f "$(ratio "${mibs[open]}" "${mibs[host]}")")x"
echo "(the issue's aim: under 1 ms added p50, at least 0.9x the throughput)"
