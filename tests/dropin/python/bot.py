"""A discord.py bot for shardwarden's drop-in tests (and for trying the front door by hand).

It connects like any discord.py bot, except that the REST base and the gateway URL come
from the environment (discord.py has no option for them: it reads ``Route.BASE`` and
``DiscordWebSocket.DEFAULT_GATEWAY``; with a fixed ``shard_count`` it never asks
``/gateway/bot`` for the URL).

Environment:
  SW_API_BASE     REST base, e.g. http://127.0.0.1:7878/api/v10         (required)
  SW_GATEWAY      gateway URL, e.g. ws://127.0.0.1:7878                   (required)
  SW_TOKEN        bot token, without "Bot "                               (required)
  SW_SHARDS       shard ids this process runs, e.g. "0,1"                 (default "0")
  SW_SHARD_COUNT  total shard count                                      (default 1)
  SW_COMPRESS     "zlib-stream": hide zstandard, so discord.py asks for zlib-stream as it
                  does where zstandard is not installed (default: zstd-stream)
  SW_INTENTS      intents bitfield (default GUILDS|GUILD_MEMBERS|GUILD_EXPRESSIONS|
                  GUILD_MESSAGES|MESSAGE_CONTENT = 33291)

stdout: one JSON object per line, "event" names it (see tests/dropin/README.md).
stdin: one JSON command per line: send, change_presence, request_members, exit.
"""

import asyncio
import json
import os
import sys
import threading
import traceback

if os.environ.get("SW_COMPRESS") == "zlib-stream":
    # As if zstandard were not installed: discord.py then falls back to zlib-stream.
    sys.modules["zstandard"] = None

import discord  # noqa: E402
import discord.gateway  # noqa: E402
import discord.http  # noqa: E402
import yarl  # noqa: E402

LIB = "discord.py"
DEFAULT_INTENTS = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 9) | (1 << 15)


def emit(event, **fields):
    fields = {"event": event, "lib": LIB, **fields}
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def guild_summary(guild):
    channels = list(guild.channels)  # categories, text, voice, stage, forum: no threads
    return {
        "id": str(guild.id),
        "shard": guild.shard_id,
        "name": guild.name,
        "channels": len(channels),
        "text_channels": len(guild.text_channels),
        "voice_channels": len(guild.voice_channels),
        "categories": len(guild.categories),
        "threads": len(guild.threads),
        "roles": len(guild.roles),
        "emojis": len(guild.emojis),
        "stickers": len(guild.stickers),
        "members": len(guild.members),
        "member_count": guild.member_count,
        "me": guild.me is not None,
    }


class Bot(discord.AutoShardedClient):
    def __init__(self, shard_ids, shard_count, intents):
        super().__init__(
            shard_ids=shard_ids,
            shard_count=shard_count,
            intents=discord.Intents._from_value(intents),
            chunk_guilds_at_startup=False,
        )
        self.stdin_task = None

    async def setup_hook(self):
        self.stdin_task = asyncio.create_task(self.read_commands())

    async def on_shard_ready(self, shard_id):
        emit("shard_ready", shard=shard_id)

    async def on_ready(self):
        emit(
            "ready",
            user_id=str(self.user.id),
            application_id=str(self.application_id) if self.application_id else None,
            shards=sorted(self.shards.keys()),
            guilds=[guild_summary(g) for g in sorted(self.guilds, key=lambda g: g.id)],
        )

    async def on_shard_resumed(self, shard_id):
        emit("resumed", shard=shard_id)

    async def on_shard_disconnect(self, shard_id):
        emit("disconnect", shard=shard_id)

    async def on_message(self, message):
        emit(
            "message_create",
            shard=message.guild.shard_id if message.guild else None,
            id=str(message.id),
            channel_id=str(message.channel.id),
            guild_id=str(message.guild.id) if message.guild else None,
            author_id=str(message.author.id),
            content=message.content,
        )

    async def on_error(self, event_method, *args, **kwargs):
        emit("error", where=event_method, message=traceback.format_exc(limit=3))

    async def read_commands(self):
        # A daemon thread, not run_in_executor: asyncio.run() waits for its executor's
        # threads at exit, so a readline blocked there kept the bot alive after a fatal
        # gateway close instead of exiting with status 2.
        loop = asyncio.get_running_loop()
        lines = asyncio.Queue()

        def pump():
            try:
                while True:
                    line = sys.stdin.readline()
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                    if not line:
                        return
            except RuntimeError:  # the loop is closed: the bot is exiting
                return

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        while True:
            line = await lines.get()
            if not line:
                emit("exit", reason="stdin closed")
                await self.close()
                return
            line = line.strip()
            if not line:
                continue
            try:
                cmd = json.loads(line)
            except ValueError as e:
                emit("error", where="stdin", message=f"bad JSON: {e}")
                continue
            if cmd.get("op") == "exit":
                emit("exit", reason="asked")
                await self.close()
                return
            asyncio.create_task(self.run_command(cmd))

    async def run_command(self, cmd):
        op, ref = cmd.get("op"), cmd.get("ref")
        try:
            if op == "send":
                channel_id = int(cmd["channel_id"])
                channel = self.get_channel(channel_id) or self.get_partial_messageable(channel_id)
                msg = await channel.send(cmd["content"])
                emit("sent", ref=ref, id=str(msg.id), channel_id=str(msg.channel.id), content=msg.content)
            elif op == "change_presence":
                status = discord.Status(cmd.get("status", "online"))
                name = cmd.get("activity")
                activity = discord.Game(name=name) if name else None
                await self.change_presence(status=status, activity=activity)
                emit("presence_changed", ref=ref, status=str(status), activity=name)
            elif op == "request_members":
                guild = self.get_guild(int(cmd["guild_id"]))
                if guild is None:
                    raise LookupError(f"guild {cmd['guild_id']} is not in the cache")
                members = await asyncio.wait_for(guild.chunk(cache=True), timeout=15)
                emit(
                    "members",
                    ref=ref,
                    guild_id=str(guild.id),
                    count=len(members),
                    ids=sorted(str(m.id) for m in members),
                )
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # reported, never fatal
            status = getattr(e, "status", None)
            emit("error", ref=ref, where=op, message=f"{type(e).__name__}: {e}", status=status)


async def main():
    api_base = os.environ["SW_API_BASE"].rstrip("/")
    gateway = os.environ["SW_GATEWAY"]
    token = os.environ["SW_TOKEN"]
    shard_ids = [int(s) for s in os.environ.get("SW_SHARDS", "0").split(",") if s.strip()]
    shard_count = int(os.environ.get("SW_SHARD_COUNT", "1"))
    intents = int(os.environ.get("SW_INTENTS", DEFAULT_INTENTS))

    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)

    emit("starting", version=discord.__version__, shards=shard_ids, shard_count=shard_count)
    bot = Bot(shard_ids, shard_count, intents)
    try:
        await bot.start(token)
    except discord.ConnectionClosed as e:
        emit("error", where="gateway", message=str(e), close_code=e.code, shard=e.shard_id)
        return 2
    except discord.PrivilegedIntentsRequired as e:
        emit("error", where="gateway", message=str(e), close_code=4014, shard=e.shard_id)
        return 2
    except discord.HTTPException as e:
        emit("error", where="login", message=str(e), status=e.status)
        return 2
    except discord.LoginFailure as e:
        emit("error", where="login", message=str(e), status=401)
        return 2
    finally:
        if not bot.is_closed():
            await bot.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
