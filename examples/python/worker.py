#!/usr/bin/env python3
"""A remote shardwarden worker: reads events from NATS JetStream with a
durable consumer and explicit acks (at-least-once), and sends a gateway
command that the daemon owning the shard answers (DESIGN §4).

    pip install nats-py        # examples/python/requirements-worker.txt
    python3 worker.py --nats nats://127.0.0.1:4222 --stream shardwarden

Each event arrives on `{stream}.events.{shard}.{EVENT}`; the body is
Discord's `d`, the headers say the shard, seq and cursor, and `Nats-Msg-Id`
is `{session_id}:{seq}` (JetStream drops duplicates a daemon restart or
failover replays). The durable consumer remembers what this worker acked, so
a restarted worker goes on where it stopped. One JSON line per event goes to
stdout; `--count N` stops after N events, `--command JSON` sends a §3.3
`send` object first and prints the daemon's answer.
"""

import argparse
import asyncio
import json
import sys

import nats
from nats.errors import TimeoutError as NatsTimeout


def emit(**fields):
    print(json.dumps(fields), flush=True)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="shardwarden")
    parser.add_argument("--durable", default="worker")
    parser.add_argument("--events", default=">", help="event filter, e.g. '*.MESSAGE_CREATE'")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events")
    parser.add_argument("--command", help="a send object to send first, as JSON")
    parser.add_argument("--idle-exit", type=float, default=0, help="stop after this many idle seconds")
    args = parser.parse_args()

    nc = await nats.connect(args.nats, name="shardwarden-worker")
    try:
        if args.command:
            reply = await nc.request(f"{args.stream}.commands", args.command.encode(), timeout=10)
            emit(kind="command_answer", answer=json.loads(reply.data))

        js = nc.jetstream()
        subject = f"{args.stream}.events.{args.events}"
        sub = await js.pull_subscribe(subject, durable=args.durable, stream=args.stream)
        seen, idle = 0, 0.0
        while args.count == 0 or seen < args.count:
            try:
                # Never take more than will be handled: a fetched message
                # that is not acked waits for ack_wait before it comes again.
                want = 100 if args.count == 0 else min(100, args.count - seen)
                batch = await sub.fetch(want, timeout=1)
            except NatsTimeout:
                idle += 1
                if args.idle_exit and idle >= args.idle_exit:
                    break
                continue
            idle = 0.0
            for msg in batch:
                headers = msg.headers or {}
                emit(
                    kind="event",
                    subject=msg.subject,
                    shard=int(headers.get("Shardwarden-Shard", -1)),
                    seq=int(headers.get("Shardwarden-Seq", -1)),
                    id=headers.get("Nats-Msg-Id"),
                    d=json.loads(msg.data),
                )
                # Ack after the work is done: unacked events come again.
                await msg.ack()
                seen += 1
                if args.count and seen >= args.count:
                    break
        emit(kind="done", events=seen)
    finally:
        await nc.drain()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
