#!/usr/bin/env bash
# Benchmark: attaching to a session (container backend) against a plain
# `ssh -t` that reuses the same master connection to the same tmux session,
# measured in the same run.
#
#  1. attach latency: from starting the command to the session's first
#     screen (a marker the session's pane shows) arriving on the terminal;
#  2. keystroke echo: one key typed into the attached client until the
#     session draws it back.
#
# Each client runs on its own pseudo-terminal (python3's pty module reads
# the raw output, so nothing polls a screen). Prints medians and ratios.
# Not a test: nothing here fails on time.
#   sudo ./bench/attach.sh [ITERATIONS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
N=${1:-15}
bench_require python3:python3
bench_build
bench_project bench container
export TERM=xterm-256color LANG=C.UTF-8
$K agent start --no-attach >/dev/null 2>&1
# The session, with a marker on its screen that every attach redraws.
$K agent exec -- tmux new-session -d -s bench-main -x 100 -y 30 -c /workspace \
    "printf 'BENCH-READY\n'; exec bash --norc --noprofile"
cfg=$XDG_STATE_HOME/keystone/sandboxes/bench/ssh/config
ssh -F "$cfg" keystone-bench -- true     # the master connection both reuse

python3 - "$N" "$K" "$cfg" <<'EOF'
import os, pty, select, signal, statistics, sys, termios, time

n, keystone, cfg = int(sys.argv[1]), sys.argv[2], sys.argv[3]
clients = {
    "keystone attach": [keystone, "agent", "attach"],
    "plain ssh -t":    ["ssh", "-F", cfg, "-tt", "keystone-bench", "--", "tmux", "-u", "attach", "-t", "bench-main"],
}

def read_until(fd, needle, limit=20.0):
    seen, deadline = b"", time.monotonic() + limit
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"timed out waiting for {needle!r}; saw {seen[-300:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                raise SystemExit(f"client exited; saw {seen[-300:]!r}")
            seen += chunk
    return seen

def one(argv):
    t0 = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    read_until(fd, b"BENCH-READY")
    attach = time.monotonic() - t0
    # The echo must come from the session, not from the local line
    # discipline: the client has put its terminal into raw mode.
    if termios.tcgetattr(fd)[3] & termios.ECHO:
        raise SystemExit(f"{argv[0]}: the local terminal still echoes; the echo figure would be meaningless")
    time.sleep(0.2)
    while select.select([fd], [], [], 0.05)[0]:
        os.read(fd, 65536)
    echoes = []
    for ch in "qwertyuiop":
        t0 = time.monotonic()
        os.write(fd, ch.encode())
        read_until(fd, ch.encode())
        echoes.append(time.monotonic() - t0)
        time.sleep(0.02)
    os.write(fd, b"\x15")            # Ctrl-U: clear the typed line
    time.sleep(0.1)
    os.write(fd, b"\x02d")           # Ctrl-b d: detach
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if select.select([fd], [], [], 0.05)[0]:
            try:
                os.read(fd, 65536)
            except OSError:
                pass
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(fd)
    return attach, statistics.median(echoes)

results = {name: ([], []) for name in clients}
one(clients["keystone attach"])          # warm-up (page cache, binary)
for _ in range(n):
    for name, argv in clients.items():   # interleaved: same conditions
        a, e = one(argv)
        results[name][0].append(a * 1000)
        results[name][1].append(e * 1000)

ks_a, ks_e = (statistics.median(x) for x in results["keystone attach"])
ssh_a, ssh_e = (statistics.median(x) for x in results["plain ssh -t"])
print(f"attach to first screen:  keystone {ks_a:.1f} ms, plain reused ssh -t {ssh_a:.1f} ms, ratio {ks_a / ssh_a:.2f}x   (median of {n})")
print(f"keystroke echo:          keystone {ks_e:.1f} ms, plain reused ssh -t {ssh_e:.1f} ms, ratio {ks_e / ssh_e:.2f}x   (median of {n}x10)")
EOF
