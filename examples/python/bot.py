#!/usr/bin/env python3
"""Example shardwarden bot client (Python 3.11, standard library only).

Connects to the daemon's Unix socket, resumes from the cursor saved in a file,
prints every event as "cursor shard t", acknowledges every N events and saves
the cursor (atomically) after each acknowledgement. Ctrl-C / SIGTERM stop it
cleanly: it acknowledges what it has handled, saves the cursor and exits 0.
When the daemon says `closing` (a clean stop or restart) the bot waits for it
to come back and reconnects from its cursor, quietly; a connection that ends
without `closing` (the daemon crashed) exits 1, so its supervisor notices.

    python3 bot.py [SOCKET] [--cursor-file F] [--ack-every N] [--events A,B]
                   [--max-events N]

SOCKET defaults to $SHARDWARDEN_SOCKET, then /run/shardwarden/bot.sock.
"""
import argparse
import json
import os
import selectors
import signal
import socket
import sys


def read_cursor(path):
    """The last cursor this bot finished with; 0 (everything held) on first start."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0


def save_cursor(path, cursor):
    """Write to a temporary file and rename it over the old one, so a crash
    leaves either the old cursor or the new one, never a torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{cursor}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description="Example shardwarden bot client")
    p.add_argument("socket", nargs="?",
                   default=os.environ.get("SHARDWARDEN_SOCKET", "/run/shardwarden/bot.sock"))
    p.add_argument("--cursor-file", default="bot.cursor")
    p.add_argument("--ack-every", type=int, default=100, metavar="N")
    p.add_argument("--events", default="*", help="comma-separated dispatch names, or *")
    p.add_argument("--max-events", type=int, default=0, metavar="N",
                   help="exit after N dispatches (0 = never)")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    # Signals only write a byte to this socket pair; the loop below notices it
    # between messages, so a shutdown never interrupts a half-written ack.
    sig_r, sig_w = socket.socketpair()
    sig_w.setblocking(False)
    signal.set_wakeup_fd(sig_w.fileno())
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: None)

    def connect(retry):
        """A connected socket; with `retry`, wait for the daemon to come back
        (None if a signal stopped the wait)."""
        delay = 0.2
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(args.socket)
                return sock
            except OSError as e:
                sock.close()
                if not retry:
                    sys.exit(f"cannot connect to {args.socket}: {e}")
            ready = selectors.DefaultSelector()
            ready.register(sig_r, selectors.EVENT_READ)
            if ready.select(timeout=delay):
                return None
            delay = min(delay * 2, 5.0)

    resume_from = read_cursor(args.cursor_file)
    handled = acked = resume_from  # newest cursor handled / acknowledged
    count = 0  # dispatches handled
    welcomed = False
    closing = None  # the daemon's `closing` message on this connection
    sock = connect(retry=False)

    def send(msg):
        sock.sendall(json.dumps(msg).encode() + b"\n")

    def ack():
        nonlocal acked
        if handled > acked:
            send({"op": "ack", "cursor": handled})
            save_cursor(args.cursor_file, handled)
            acked = handled

    def handle(msg):
        """Handle one message; return an exit status to stop, None to go on."""
        nonlocal handled, count, welcomed, closing
        op = msg.get("op")
        if op == "dispatch":
            # Your bot's logic goes here. msg["d"] is the event exactly as
            # Discord sent it. Delivery is at-least-once: after a restart some
            # events come again; (shard, seq) within a session spots repeats.
            print(msg["cursor"], msg["shard"], msg["t"])
            handled, count = msg["cursor"], count + 1
            if count % args.ack_every == 0:
                ack()
            if args.max_events and count >= args.max_events:
                return 0
        elif op == "welcome":
            welcomed = True
            print(f"welcome shards={msg['shards']} shard_total={msg['shard_total']} "
                  f"head={msg['head']} oldest={msg['oldest']} missed={msg['missed']}")
            if msg["missed"]:
                print(f"warning: {msg['missed']} events after cursor {handled} "
                      "are no longer held and will not be delivered", file=sys.stderr)
            ack()  # after a reconnect: what was handled since the last ack
        elif op == "session":
            extra = "".join(f" {k}={msg[k]}" for k in ("class", "close_code", "seq") if k in msg)
            print(f"session shard={msg['shard']} event={msg['event']}{extra} "
                  f"detail={msg.get('detail', '')}")
        elif op == "incident":
            # A suspected Discord-side outage (or its end), daemon-wide.
            print(f"incident state={msg['state']} shards={msg['shards']} "
                  f"detail={msg.get('detail', '')}")
        elif op == "health":
            states = ",".join(f"{s['shard']}:{s['state']}" for s in msg["shards"])
            budget = msg.get("identify_budget", {})
            print(f"health shards={states} identify_budget="
                  f"{budget.get('remaining')}/{budget.get('total')}")
        elif op == "gap":
            # Events this bot fell too far behind to receive; they are gone.
            print(f"gap from={msg['from']} to={msg['to']} missed={msg['missed']}")
        elif op == "closing":
            # The daemon closes this connection on purpose (a stop or a
            # restart); the end of the connection that follows is expected.
            closing = msg
        elif op == "error":
            about = f" id={msg['id']}" if msg.get("id") else ""
            print(f"error code={msg.get('code')}{about} message={msg.get('message')}",
                  file=sys.stderr)
            if not welcomed:
                return 1  # the hello was refused; fix the arguments
        return None

    status = None
    try:
        while status is None:
            send({"op": "hello", "v": 1, "client": "example-python",
                  "events": args.events.split(","), "diagnostics": True,
                  "resume_from": handled})
            sel = selectors.DefaultSelector()
            sel.register(sock, selectors.EVENT_READ)
            sel.register(sig_r, selectors.EVENT_READ)
            buf, ended = b"", False
            while status is None and not ended:
                for key, _ in sel.select():
                    if key.fileobj is sig_r:
                        status = 0
                        break
                    data = sock.recv(65536)
                    if not data:
                        ended = True
                        break
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip() and status is None:
                            status = handle(json.loads(line))
            sel.close()
            if status is not None:
                break
            if closing is None:
                print("the daemon closed the connection without saying why "
                      "(did it crash?)", file=sys.stderr)
                status = 1
                break
            # A clean daemon stop or restart: remember what was handled, wait
            # for the daemon to come back, and go on from the cursor.
            print(f"daemon closing ({closing.get('reason')}): reconnecting")
            save_cursor(args.cursor_file, handled)
            sock.close()
            closing, welcomed = None, False
            sock = connect(retry=True)
            if sock is None:
                status = 0
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        try:
            ack()
        except OSError:
            # The daemon is gone; still remember what was handled.
            save_cursor(args.cursor_file, handled)
        sock.close()
    sys.exit(status)


if __name__ == "__main__":
    main()
