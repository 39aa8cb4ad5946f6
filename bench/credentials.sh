#!/usr/bin/env bash
# Benchmark: credential injection (container backend, `[egress] mode =
# "allowlist"`), one run, one sandbox, one lab server: the added latency
# of an intercepted HTTPS request (the egress point terminates the guest's
# TLS with a keystone-CA certificate, puts the real value of BENCH_TOKEN
# in place of the guest's placeholder, and sends the request on over its
# own pooled TLS connection to the upstream) against a tunnelled one (a
# host without credentials: CONNECT, SNI checked, bytes relayed).
#
# In the guest, through the explicit proxy (the guest shell's default
# HTTPS_PROXY), ONE curl per path and round makes N requests to the same
# URL, so every request after the first reuses curl's connection (curl's
# own %{time_total}, so exec/ssh overhead is not in it), with the header
# `x-api-key: $BENCH_TOKEN` (the placeholder):
#
#   intercepted  https://inj.lab.test/   (`credentials.hosts`: injected)
#   tunnelled    https://tun.lab.test/   (allowed, no credential)
#
# interleaved in rounds (the order alternating). Reported: p50 and p90 of
# the requests on a reused connection (request 2..N of every curl, the
# rounds pooled) and the median over the rounds of the first request (a
# new connection, with its TLS handshake: for the intercepted path that is
# the guest's handshake with the egress point, whose upstream connection
# is usually already pooled); and p50(intercepted) - p50(tunnelled). The
# same curl from the host straight to the lab is printed as the floor.
# Both paths use HTTP/1.1 (`--http1.1`; the interception speaks HTTP/1.1,
# and the tunnel would otherwise negotiate h2 with the server) and the same
# CA file: the guest's bundle (which holds keystone's CA since start) plus
# the lab CA, copied into the guest.
#
# Before measuring, one request per host to /check, whose header the lab
# server logs, verifies that inj.lab.test received the real value (the
# guest's default trust store, no --cacert) and tun.lab.test the
# placeholder; the bench fails if not.
#
# The lab is a network namespace behind a veth pair on 198.51.99.0/24
# (not the /24 the end-to-end tests' lab uses): a lab CA made by openssl,
# an HTTPS server (caddy if installed, else python3 http.server, HTTP/1.1
# keep-alive) with one certificate for both names signed by it, logging
# every request (so the upstream connections are counted), and a python3
# DNS responder that keystone's host-side resolution is pointed at
# (`[egress] resolver`). keystone runs with SSL_CERT_FILE = the host's
# bundle + the lab CA, so the egress point trusts the lab as an upstream
# (and, guest.trust_host_cas being "auto", the guest trusts it too).
#
# Prints absolute figures and differences. Not a test: nothing here fails
# on time.
#   sudo ./bench/credentials.sh [ITERATIONS [ROUNDS]]  # default 50 requests per curl, 3 rounds
#   (BENCH_EGRESS_NET=A.B.C puts the lab on A.B.C.0/24 instead of 198.51.99.0/24;
#   BENCH_KEYSTONE=PATH measures that keystone binary instead of building this
#   checkout's; BENCH_EGRESS_LOG=FILE appends the egress daemon's log to FILE,
#   e.g. with RUST_LOG=keystone_egress=debug)
#
# shellcheck disable=SC2016  # the guest's scripts are single-quoted on purpose
# shellcheck source-path=SCRIPTDIR source=lib.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-50}                                    # requests per curl (the first: a new connection)
ROUNDS=${2:-3}                                # one curl per path, this many times, pooled
[ "$N" -ge 2 ] || { echo "ITERATIONS must be at least 2 (the first request of a curl is set apart)" >&2; exit 4; }
[ "$ROUNDS" -ge 1 ] || { echo "ROUNDS must be at least 1" >&2; exit 4; }
bench_require curl:curl openssl:openssl python3:python3 ip:iproute2 pasta:passt bc:bc
[ "$(id -u)" = 0 ] || { echo "run as root (it makes a network namespace)" >&2; exit 4; }
HOST_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -r "$HOST_BUNDLE" ] || { echo "$HOST_BUNDLE is required: apt-get install ca-certificates" >&2; exit 4; }

# The lab's /24 (first three octets): no route on the host may use it, and
# keystone must not count it special (private, CGNAT, 198.18/15: refused).
NET=${BENCH_EGRESS_NET:-198.51.99}
if ip -4 route show | grep -qF -e "$NET." ; then
    echo "$NET.0/24 is already routed on this host (ip route: $(ip -4 route show | grep -F "$NET." | head -1));" \
        "wait for its user or set BENCH_EGRESS_NET to a free /24" >&2
    exit 4
fi
HOST_IP=$NET.1 LAB_IP=$NET.2 INJ=inj.lab.test TUN=tun.lab.test

# The real value: the host's environment, which the guest never sees.
BENCH_TOKEN=bench-$(python3 -c 'import secrets, string; a = string.ascii_letters + string.digits; print("".join(secrets.choice(a) for _ in range(32)))')
export BENCH_TOKEN

if [ -n "${BENCH_KEYSTONE:-}" ]; then K=$BENCH_KEYSTONE; else bench_build; fi
bench_project benchcred container '' "$(printf '%s\\n' \
    'forward_env = ["BENCH_TOKEN"]' \
    '[egress]' 'mode = "allowlist"' 'presets = []' "allow = [\"$INJ\", \"$TUN\"]" "resolver = \"$LAB_IP\"" \
    '[credentials]' "hosts = [\"BENCH_TOKEN=$INJ\"]")"
sdir=$XDG_STATE_HOME/keystone/sandboxes/benchcred

# --- the lab --------------------------------------------------------------
lab=$work/lab ns=ksc-lab-$$ veth=ksc$$
mkdir -p "$lab"
ip netns add "$ns"
bench_at_exit "ip netns del $ns"
ip link add "$veth" type veth peer name eth0 netns "$ns"
bench_at_exit "ip link del $veth 2>/dev/null"
ip addr add "$HOST_IP/24" dev "$veth"
ip link set "$veth" up
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$LAB_IP/24" dev eth0
ip -n "$ns" link set eth0 up

# The lab CA, and one server certificate for both names signed by it.
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=keystone bench lab CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$lab/ca.key" -out "$lab/ca.pem" 2>/dev/null
openssl req "${ec[@]}" -subj "/CN=$INJ" -keyout "$lab/key.pem" -out "$lab/cert.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$INJ" "$TUN" > "$lab/cert.ext"
openssl x509 -req -in "$lab/cert.csr" -CA "$lab/ca.pem" -CAkey "$lab/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days 2 -extfile "$lab/cert.ext" -out "$lab/cert.pem" 2>/dev/null
openssl verify -CAfile "$lab/ca.pem" "$lab/cert.pem" >/dev/null \
    || { echo "the lab's certificate does not verify against the lab CA" >&2; exit 1; }
# What keystone (the egress point's upstream TLS) trusts.
cat "$HOST_BUNDLE" "$lab/ca.pem" > "$lab/trust.pem"

# Every request is logged (JSON lines): SNI, path, x-api-key, client port.
if command -v caddy >/dev/null; then
    server="caddy $(caddy version | cut -d' ' -f1)"
    cat > "$lab/Caddyfile" <<EOF
{
	admin off
	auto_https off
}
https://$INJ:443, https://$TUN:443 {
	tls $lab/cert.pem $lab/key.pem
	log {
		output file $lab/access.log
		format json
	}
	respond "ok
" 200
}
EOF
    HOME=$lab XDG_DATA_HOME=$lab/data XDG_CONFIG_HOME=$lab/data \
        ip netns exec "$ns" caddy run --adapter caddyfile --config "$lab/Caddyfile" >"$lab/https.log" 2>&1 &
else
    server="python3 http.server + ssl (threading, HTTP/1.1 keep-alive)"
    cat > "$lab/https.py" <<'EOF'
import http.server, json, ssl, sys, threading
lab = sys.argv[1]
log, lock = open(lab + "/access.log", "a", buffering=1), threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive
    disable_nagle_algorithm = True
    wbufsize = -1                          # headers and body in one write
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        ev = {"request": {"remote_port": str(self.client_address[1]), "uri": self.path,
                          "headers": {"X-Api-Key": self.headers.get_all("x-api-key") or []},
                          "tls": {"server_name": getattr(self.connection, "sni", None) or self.headers.get("Host", "").split(":")[0]}}}
        with lock:
            log.write(json.dumps(ev) + "\n")
    def log_message(self, *a):
        pass
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(lab + "/cert.pem", lab + "/key.pem")
def sni(sock, name, ctx):
    sock.sni = name
c.sni_callback = sni
s = http.server.ThreadingHTTPServer((sys.argv[2], 443), H)
s.daemon_threads = True
s.socket = c.wrap_socket(s.socket, server_side=True)
s.serve_forever()
EOF
    ip netns exec "$ns" python3 "$lab/https.py" "$lab" "$LAB_IP" >"$lab/https.log" 2>&1 &
fi
bench_at_exit "kill $!"

# DNS: both names → LAB_IP (A), no AAAA, NXDOMAIN for anything else.
cat > "$lab/dns.py" <<'EOF'
import socket, struct, sys
ip, names = socket.inet_aton(sys.argv[1]), {n.lower() for n in sys.argv[2:]}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    i, labels = 12, []
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace")); i += 1 + q[i]
    qend = i + 5
    qtype, = struct.unpack("!H", q[i + 1:i + 3])
    ours = ".".join(labels).lower() in names
    ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + ip if ours and qtype == 1 else b""
    flags = 0x8400 | (q[2] & 1) << 8 | (0 if ours else 3)
    s.sendto(q[:2] + struct.pack("!HHHHH", flags, 1, 1 if ans else 0, 0, 0) + q[12:qend] + ans, peer)
EOF
ip netns exec "$ns" python3 "$lab/dns.py" "$LAB_IP" "$INJ" "$TUN" >"$lab/dns.log" 2>&1 &
bench_at_exit "kill $!"

pin=(--resolve "$INJ:443:$LAB_IP" --resolve "$TUN:443:$LAB_IP")
timeout 20 bash -c "until curl -sf --noproxy '*' --cacert $lab/ca.pem ${pin[*]} -o /dev/null https://$TUN/up; do sleep 0.1; done" \
    || { echo "the lab's HTTPS server did not come up:" >&2; cat "$lab/https.log" >&2; exit 1; }
timeout 5 python3 - "$LAB_IP" "$INJ" "$TUN" <<'EOF' || { echo "the lab's DNS responder does not answer" >&2; exit 1; }
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
for name in sys.argv[2:]:
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    for _ in range(40):
        try:
            s.sendto(q, (sys.argv[1], 53)); r = s.recv(512)
            assert r[-4:] == socket.inet_aton(sys.argv[1]), r; break
        except socket.timeout:
            pass
    else:
        sys.exit(1)
EOF

# --- the sandbox ------------------------------------------------------------
# SSL_CERT_FILE reaches the egress daemon (keystone passes it on): its
# upstream TLS verifies the lab's certificate with it.
export SSL_CERT_FILE=$lab/trust.pem
timeout 1200 "$K" agent start --no-attach >"$work/start.log" 2>&1 \
    || { echo "agent start failed:" >&2; cat "$work/start.log" >&2; exit 1; }
proxy=$(timeout 60 "$K" agent exec -- sh -c 'echo "${HTTPS_PROXY:-}"')
[ -n "$proxy" ] || { echo "the guest has no HTTPS_PROXY (allowlist mode has one):" >&2; cat "$work/start.log" >&2; exit 1; }
placeholder=$(timeout 60 "$K" agent exec -- sh -c 'echo "${BENCH_TOKEN:-}"')
GCA=/tmp/bench-credentials-ca.pem
timeout 60 "$K" agent exec -- sh -c 'cat /etc/ssl/certs/ca-certificates.crt > "$1.tmp" && printf "%s\n" "$2" >> "$1.tmp" && mv "$1.tmp" "$1"' \
    sh "$GCA" "$(cat "$lab/ca.pem")"

# --- the check: the real value for inj, the placeholder for tun ---------------
# lab_keys SNI PATH: the x-api-key values the lab received, one a line.
lab_keys() {
    python3 - "$lab/access.log" "$1" "$2" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line).get("request", {})
    if r.get("tls", {}).get("server_name") == sys.argv[2] and r.get("uri") == sys.argv[3]:
        print(",".join(r.get("headers", {}).get("X-Api-Key", [])) or "(none)")
EOF
}
what() {
    case $1 in
        "") echo "nothing (no request logged)" ;;
        "$BENCH_TOKEN") echo "the real value" ;;
        "$placeholder") echo "the placeholder" ;;
        *) echo "something else (${1:0:12}…)" ;;
    esac
}
check_out=$(timeout 60 "$K" agent exec -- bash -c '
    for u in "$@"; do
        case $u in *'"$TUN"'*) ca=(--cacert '"$GCA"') ;; *) ca=() ;; esac
        curl -s --http1.1 --max-time 10 "${ca[@]}" -H "x-api-key: $BENCH_TOKEN" -o /tmp/bench-check.body \
            -w "$u %{http_code}\n" "$u" || echo "$u curl-exit-$?"
        [ "$(tail -c 4 /tmp/bench-check.body 2>/dev/null)" = "ok" ] || { printf "  body: "; head -c 400 /tmp/bench-check.body; echo; }
    done' check "https://$INJ/check" "https://$TUN/check" 2>&1) || true
sleep 0.5                                     # the server's log line
inj_seen=$(lab_keys "$INJ" /check | tail -1) tun_seen=$(lab_keys "$TUN" /check | tail -1)
decisions_file=$sdir/egress/decisions.jsonl
injected_n() { grep -c '"injected BENCH_TOKEN"' "$decisions_file" 2>/dev/null || true; }
ok_guest=no ok_inj=no ok_tun=no
[ -n "$placeholder" ] && [ "$placeholder" != "$BENCH_TOKEN" ] && ok_guest=yes
[ "$inj_seen" = "$BENCH_TOKEN" ] && ok_inj=yes
[ -n "$placeholder" ] && [ "$tun_seen" = "$placeholder" ] && ok_tun=yes
echo "check: the guest holds a placeholder for BENCH_TOKEN: $ok_guest"
echo "check: injected real value for inj.lab.test: $ok_inj"
echo "check: placeholder passed unchanged to tun.lab.test: $ok_tun"
if [ "$ok_guest$ok_inj$ok_tun" != yesyesyes ]; then
    {
        echo "the check failed; what the guest's curl said:"
        printf '%s\n' "$check_out" | sed 's/^/  /'
        echo "the lab received: inj.lab.test: $(what "${inj_seen:-}") / tun.lab.test: $(what "${tun_seen:-}")"
        echo "keystone agent start said:"; sed 's/^/  /' "$work/start.log"
        echo "keystone agent egress log (last 20):"; timeout 30 "$K" agent egress log -n 20 2>&1 | sed 's/^/  /'
        echo "egress daemon log (last 20 lines of $sdir/logs/egress.log):"; tail -n 20 "$sdir/logs/egress.log" 2>&1 | sed 's/^/  /'
    } >&2
    exit 1
fi

# --- measuring --------------------------------------------------------------
# One curl, N requests to URL over one connection: "LABEL I time_total
# num_connects http_code" per request, or "LABEL error ..." when curl
# fails. Run where it is given (host or guest), extra curl args after URL.
probe_script='
label=$1 n=$2 url=$3; shift 3
cfg=$(mktemp)
i=0; while [ "$i" -lt "$n" ]; do printf "url = \"%s\"\noutput = \"/dev/null\"\n" "$url"; i=$((i + 1)); done > "$cfg"
out=$(curl -s --http1.1 --max-time 10 "$@" -K "$cfg" -w "%{time_total} %{num_connects} %{http_code}\n"); rc=$?
rm -f "$cfg"
printf "%s\n" "$out" | awk -v l="$label" "NF {print l, NR, \$0}"
[ "$rc" = 0 ] || echo "$label error curl-exit-$rc"
'
printf '%s' "$probe_script" > "$lab/probe.sh"
# A guest round: the two paths, in the order given.
guest_round='
probe=$1 n=$2 ca=$3; shift 3
for p in "$@"; do
    url=https://${p#*=}/
    bash -c "$probe" probe "${p%%=*}" "$n" "$url" --cacert "$ca" -H "x-api-key: $BENCH_TOKEN"
done
'
round_timeout=$(( N * 2 * 10 + 60 ))          # curl --max-time bounds each request
: > "$work/all.txt"
for round in $(seq 0 "$ROUNDS"); do
    # Round 0 is a discarded warm-up of a few requests.
    if [ "$round" = 0 ]; then n=5 out=/dev/null; else n=$N out=$work/all.txt; fi
    if [ "$round" = 1 ]; then
        sleep 0.3; since=$(wc -l < "$lab/access.log")   # the lab's log lines before the measurement
    fi
    if [ $((round % 2)) = 1 ]; then order=("inj=$INJ" "tun=$TUN"); else order=("tun=$TUN" "inj=$INJ"); fi
    # The floor: the host itself, straight to the lab.
    timeout "$round_timeout" bash "$lab/probe.sh" host "$n" "https://$INJ/floor" --noproxy '*' \
        --cacert "$lab/ca.pem" "${pin[@]}" -H "x-api-key: $BENCH_TOKEN" >> "$out" \
        || echo "host error exit-$?" >> "$out"
    timeout "$round_timeout" "$K" agent exec -- bash -c "$guest_round" round \
        "$probe_script" "$n" "$GCA" "${order[@]}" >> "$out" \
        || echo "guest error exit-$?" >> "$out"
done
[ -z "${BENCH_EGRESS_LOG:-}" ] || cat "$sdir/logs/egress.log" >> "$BENCH_EGRESS_LOG" 2>/dev/null || true
sleep 0.5
# Connections the lab accepted during the measurement, per name (all from
# the host: the egress point's upstream connections, or the tunnels).
upstream=$(tail -n +"$((since + 1))" "$lab/access.log" | python3 -c 'import collections, json, sys
c = collections.defaultdict(set)
for line in sys.stdin:
    r = json.loads(line).get("request", {})
    if r.get("uri") == "/":
        c[r.get("tls", {}).get("server_name")].add(r.get("remote_port"))
print(" ".join(f"{n}={len(c[n])}" for n in sys.argv[1:]))' "$INJ" "$TUN")
decisions=$(python3 -c 'import collections, json, sys
c = collections.Counter((e["proto"], e["decision"]) for e in map(json.loads, open(sys.argv[1])))
print(", ".join(f"{p} {d} {n}" for (p, d), n in sorted(c.items())))' "$decisions_file")

# --- report -------------------------------------------------------------------
# values LABEL WHICH < results: time_total of LABEL's requests, WHICH =
# first (request 1 of each curl) or rest (2..N).
values() { awk -v l="$1" -v w="$2" '$1 == l && $2 != "error" && $5 == 200 && ((w == "first") == ($2 == 1)) {print $3}'; }
p_of() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; print a[i]}'; }
fmt() { awk -v x="$2" "BEGIN {printf \"$1\", x}"; }
ms_of() { fmt %.3f "$(calc "$1 * 1000" 6)"; }
delta() { fmt %+.3f "$(calc "$1 - $2" 3)"; }

errors=$(awk '$2 == "error" || ($2 != "error" && $5 != 200)' "$work/all.txt" | wc -l)
# Requests 2..N that opened a connection: curl did not reuse its own.
reopened=$(awk '$2 != "error" && $2 > 1 && $4 != 0' "$work/all.txt" | wc -l)
declare -A p50 p90 first range
for path in host inj tun; do
    if [ -z "$(values "$path" rest < "$work/all.txt")" ] || [ -z "$(values "$path" first < "$work/all.txt")" ]; then
        echo "no successful request on the $path path:" >&2
        grep "^$path" "$work/all.txt" | awk '{print $1, $2 == "error" ? $0 : $5}' | sort | uniq -c | head >&2
        echo "egress log: $(tail -n 5 "$sdir/logs/egress.log" 2>/dev/null)" >&2
        exit 1
    fi
    p50[$path]=$(ms_of "$(values "$path" rest < "$work/all.txt" | p_of 50)")
    p90[$path]=$(ms_of "$(values "$path" rest < "$work/all.txt" | p_of 90)")
    first[$path]=$(ms_of "$(values "$path" first < "$work/all.txt" | median)")
    range[$path]=$(values "$path" first < "$work/all.txt" | sort -n | sed -n '1p;$p' | while read -r v; do ms_of "$v"; echo; done | paste -sd-)
done
label() { case $1 in host) echo "host (floor)" ;; inj) echo "intercepted" ;; tun) echo "tunnelled" ;; esac; }
echo "lab: $server on $LAB_IP ($INJ, $TUN; one certificate from a lab CA), python3 DNS; proxy in the guest: $proxy"
grep -E '^ *(credentials|trust|egress): ' "$work/start.log" | sed 's/^ */start: /' || true
echo "decision log: $decisions (injected BENCH_TOKEN: $(injected_n))"
echo "connections the lab accepted during the measurement: $upstream (curls per path: $ROUNDS; the floor's are not counted)"
echo "reused connection: requests 2..$N of each curl, curl time_total (ms; p50 / p90 of $((N - 1)) x $ROUNDS):"
for path in host inj tun; do
    printf '  %-13s p50 %7s  p90 %7s\n' "$(label "$path")" "${p50[$path]}" "${p90[$path]}"
done
echo "new connection: request 1 of each curl (ms; median of $ROUNDS; min-max):"
for path in host inj tun; do
    printf '  %-13s %7s   (%s)\n' "$(label "$path")" "${first[$path]}" "${range[$path]}"
done
[ "$errors" = 0 ] || echo "failed requests: $errors (see $work/all.txt)"
[ "$reopened" = 0 ] || echo "requests after the first that opened a new connection: $reopened (curl did not reuse it)"
echo "added latency, intercepted vs tunnelled, reused connection: p50 $(delta "${p50[inj]}" "${p50[tun]}") ms, p90 $(delta "${p90[inj]}" "${p90[tun]}") ms"
echo "added latency, intercepted vs tunnelled, new connection: median $(delta "${first[inj]}" "${first[tun]}") ms"
echo "tunnelled vs host (the floor), reused connection: p50 $(delta "${p50[tun]}" "${p50[host]}") ms"
echo "(the issue's aim: added latency of an intercepted request against a tunnelled one under 2 ms p50 with connection reuse)"
