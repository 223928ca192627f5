#!/usr/bin/env python3
"""Example shardwarden bot client (Python 3.11, standard library only).

Connects to the daemon's Unix socket, resumes from the cursor saved in a file,
prints every event as "cursor shard t", acknowledges every N events and saves
the cursor (atomically) after each acknowledgement. Ctrl-C / SIGTERM stop it
cleanly: it acknowledges what it has handled, saves the cursor and exits 0.

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

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as e:
        sys.exit(f"cannot connect to {args.socket}: {e}")

    def send(msg):
        sock.sendall(json.dumps(msg).encode() + b"\n")

    resume_from = read_cursor(args.cursor_file)
    send({"op": "hello", "v": 1, "client": "example-python",
          "events": args.events.split(","), "diagnostics": True,
          "resume_from": resume_from})

    # Signals only write a byte to this socket pair; the loop below notices it
    # between messages, so a shutdown never interrupts a half-written ack.
    sig_r, sig_w = socket.socketpair()
    sig_w.setblocking(False)
    signal.set_wakeup_fd(sig_w.fileno())
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(sig_r, selectors.EVENT_READ)

    handled = acked = resume_from  # newest cursor handled / acknowledged
    count = 0  # dispatches handled
    welcomed = False

    def ack():
        nonlocal acked
        if handled > acked:
            send({"op": "ack", "cursor": handled})
            save_cursor(args.cursor_file, handled)
            acked = handled

    def handle(msg):
        """Handle one message; return an exit status to stop, None to go on."""
        nonlocal handled, count, welcomed
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
                print(f"warning: {msg['missed']} events after cursor {resume_from} "
                      "are no longer held and will not be delivered", file=sys.stderr)
        elif op == "session":
            extra = "".join(f" {k}={msg[k]}" for k in ("class", "close_code", "seq") if k in msg)
            print(f"session shard={msg['shard']} event={msg['event']}{extra} "
                  f"detail={msg.get('detail', '')}")
        elif op == "health":
            states = ",".join(f"{s['shard']}:{s['state']}" for s in msg["shards"])
            budget = msg.get("identify_budget", {})
            print(f"health shards={states} identify_budget="
                  f"{budget.get('remaining')}/{budget.get('total')}")
        elif op == "gap":
            # Events this bot fell too far behind to receive; they are gone.
            print(f"gap from={msg['from']} to={msg['to']} missed={msg['missed']}")
        elif op == "error":
            about = f" id={msg['id']}" if msg.get("id") else ""
            print(f"error code={msg.get('code')}{about} message={msg.get('message')}",
                  file=sys.stderr)
            if not welcomed:
                return 1  # the hello was refused; fix the arguments
        return None

    status, buf = None, b""
    try:
        while status is None:
            for key, _ in sel.select():
                if key.fileobj is sig_r:
                    status = 0
                    break
                data = sock.recv(65536)
                if not data:
                    print("the daemon closed the connection", file=sys.stderr)
                    status = 1
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip() and status is None:
                        status = handle(json.loads(line))
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
