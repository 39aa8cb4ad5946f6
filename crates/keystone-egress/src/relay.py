#!/usr/bin/python3
# keystone egress relay: the pod side of a Kubernetes sandbox's egress.
#
# The pod's init container (`keystone_egress::relay::FENCE`) redirected
# every TCP connection to a non-loopback address onto 127.0.0.1/[::1]:15001
# and DNS to 198.18.0.1:53 over UDP onto 127.0.0.1:15053, and drops
# everything else that is not for loopback. This program hands each such
# connection or query to the host: the host keeps "pulls" open to
# 127.0.0.1:15002 through the API server's port-forward, and the relay
# writes one header line on a pull ("tcp ADDR PORT" with the address the
# guest dialled, or "dns" with one query in DNS-over-TCP framing), then
# copies bytes both ways in frames: a 4-byte big-endian length and that
# many bytes, length 0 ending that direction. The port-forward has no
# half-close (closing it loses data in flight), so each side says where
# its bytes end and only this side closes a pull, once both have ended.
#
# It is a transport only and trusts nothing: it runs inside the sandbox,
# where the agent's root can replace it, so every decision is the host's
# (which checks the same things for a lying relay as for a truthful one).
# Python 3 standard library only (the guest image's python3).
import socket
import struct
import sys
import threading
import time

CAPTURE_PORT = 15001
PULL_PORT = 15002
DNS_PORT = 15053
HELLO = b"keystone-egress-pull 2\n"
MAX_FRAME = 65536
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is 80 too
PULL_WAIT = 10.0  # seconds a guest connection waits for a pull
BUF = 65536

pulls = []
pulls_ready = threading.Condition()


def log(msg):
    sys.stderr.write("keystone-egress-relay: %s\n" % msg)
    sys.stderr.flush()


def listen(family, addr, port, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen(256)
    return s


def take_pull():
    """A pull the host opened, or None after PULL_WAIT."""
    deadline = time.monotonic() + PULL_WAIT
    with pulls_ready:
        while not pulls:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            pulls_ready.wait(left)
        return pulls.pop(0)


def send_on_pull(header):
    """Write `header` on a live pull; pulls the host has closed are skipped."""
    deadline = time.monotonic() + PULL_WAIT
    while time.monotonic() < deadline:
        p = take_pull()
        if p is None:
            return None
        try:
            p.sendall(header)
            return p
        except OSError:
            p.close()
    return None


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise OSError("closed")
        out += b
    return out


def reset(s):
    """Close with a TCP reset. SHUT_RD first wakes a thread blocked reading
    it (close alone would not) without sending anything."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    s.close()


def send_frame(pull, data):
    pull.sendall(struct.pack("!I", len(data)) + data)


def read_frame(pull):
    """The next frame's bytes; b"" for the end frame."""
    n = struct.unpack("!I", recv_exact(pull, 4))[0]
    if n > MAX_FRAME:
        raise OSError("frame too large")
    return recv_exact(pull, n) if n else b""


def guest_to_pull(guest, pull, failed):
    try:
        while True:
            b = guest.recv(BUF)
            send_frame(pull, b)
            if not b:
                return
    except OSError:
        failed[0] = True
        try:
            pull.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def splice(guest, pull):
    """Copy both ways in frames; a host that ends without a byte refuses
    (the guest gets a reset)."""
    failed = [False]
    t = threading.Thread(target=guest_to_pull, args=(guest, pull, failed), daemon=True)
    t.start()
    from_host = False
    try:
        while True:
            b = read_frame(pull)
            if not b:
                break
            from_host = True
            guest.sendall(b)
        if from_host:
            guest.shutdown(socket.SHUT_WR)
            t.join()
        else:
            reset(guest)
            guest = None
            t.join(5)
    except OSError:
        pass
    pull.close()
    if guest is not None:
        guest.close()


def original_dst(conn, family):
    if family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def captured(conn, family):
    try:
        addr, port = original_dst(conn, family)
    except OSError as e:
        log("no original destination: %s" % e)
        reset(conn)
        return
    pull = send_on_pull(("tcp %s %d\n" % (addr, port)).encode())
    if pull is None:
        log("no pull from the host for %s:%d" % (addr, port))
        reset(conn)
        return
    splice(conn, pull)


def serve(listener, handle, *args):
    """Accept for ever, each connection in a thread of its own."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            log("accept: %s" % e)
            time.sleep(0.1)
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,) + args, daemon=True).start()


def dns_query(sock, query, peer):
    pull = send_on_pull(b"dns\n")
    if pull is None:
        log("no pull from the host for a DNS query")
        return
    try:
        pull.settimeout(10)
        send_frame(pull, struct.pack("!H", len(query)) + query)
        send_frame(pull, b"")
        answer = b""
        while True:
            b = read_frame(pull)
            if not b:
                break
            answer += b
        n = struct.unpack("!H", answer[:2])[0]
        if len(answer) >= 2 + n:
            sock.sendto(answer[2 : 2 + n], peer)
    except (OSError, struct.error) as e:
        log("dns: %s" % e)
    finally:
        pull.close()


def serve_dns(sock):
    while True:
        try:
            query, peer = sock.recvfrom(4096)
        except OSError as e:
            log("dns recv: %s" % e)
            time.sleep(0.1)
            continue
        threading.Thread(target=dns_query, args=(sock, query, peer), daemon=True).start()


def pulled(conn):
    """A pull from the host: its hello, then it waits for work."""
    try:
        conn.settimeout(10)
        if recv_exact(conn, len(HELLO)) != HELLO:
            conn.close()
            return
        conn.settimeout(None)
    except OSError:
        conn.close()
        return
    with pulls_ready:
        pulls.append(conn)
        pulls_ready.notify()


def main():
    threads = []
    v4 = listen(socket.AF_INET, "127.0.0.1", CAPTURE_PORT)
    threads.append((serve, (v4, captured, socket.AF_INET)))
    try:
        v6 = listen(socket.AF_INET6, "::1", CAPTURE_PORT)
        threads.append((serve, (v6, captured, socket.AF_INET6)))
    except OSError as e:
        log("no IPv6 capture (%s); IPv6 stays unreachable" % e)
    dns = listen(socket.AF_INET, "127.0.0.1", DNS_PORT, socket.SOCK_DGRAM)
    threads.append((serve_dns, (dns,)))
    pull = listen(socket.AF_INET, "127.0.0.1", PULL_PORT)
    threads.append((serve, (pull, pulled)))
    for target, args in threads:
        threading.Thread(target=target, args=args, daemon=True).start()
    log("serving")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
