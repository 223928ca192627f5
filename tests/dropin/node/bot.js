'use strict';
// A discord.js 14 bot for shardwarden's drop-in tests (and for trying the front door by hand).
//
// It connects like any discord.js bot, except that the REST base comes from the environment
// (`rest: { api }`); the gateway URL, as always with discord.js, comes from GET /gateway/bot.
//
// Environment:
//   SW_API_BASE     REST base, e.g. http://127.0.0.1:7878/api/v10   (required; "/v10" is
//                   split off into discord.js's `rest.version`)
//   SW_TOKEN        bot token, without "Bot "                         (required)
//   SW_SHARDS       shard ids this process runs, e.g. "0,1"           (default "0")
//   SW_SHARD_COUNT  total shard count                                (default 1)
//   SW_INTENTS      intents bitfield (default GUILDS|GUILD_MEMBERS|GUILD_EXPRESSIONS|
//                   GUILD_MESSAGES|MESSAGE_CONTENT = 33291)
//
// stdout: one JSON object per line, "event" names it (see tests/dropin/README.md).
// stdin: one JSON command per line: send, change_presence, request_members, exit.

const readline = require('node:readline');
const { Client, Events, ActivityType, version } = require('discord.js');

const LIB = 'discord.js';
const DEFAULT_INTENTS = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 9) | (1 << 15);

function emit(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, lib: LIB, ...fields })}\n`);
}

function required(name) {
  const v = process.env[name];
  if (!v) {
    emit('error', { where: 'config', message: `${name} is not set` });
    process.exit(2);
  }
  return v;
}

const apiBase = required('SW_API_BASE').replace(/\/+$/, '');
const token = required('SW_TOKEN');
const shards = (process.env.SW_SHARDS ?? '0')
  .split(',')
  .filter(s => s.trim() !== '')
  .map(Number);
const shardCount = Number(process.env.SW_SHARD_COUNT ?? '1');
const intents = Number(process.env.SW_INTENTS ?? DEFAULT_INTENTS);

const m = /^(.*)\/v(\d+)$/.exec(apiBase);
const rest = m ? { api: m[1], version: m[2] } : { api: apiBase };

const client = new Client({ intents, shards, shardCount, rest });

function guildSummary(guild) {
  const channels = guild.channels.cache.filter(c => !c.isThread());
  return {
    id: guild.id,
    shard: guild.shardId,
    name: guild.name,
    channels: channels.size,
    text_channels: channels.filter(c => c.type === 0).size,
    voice_channels: channels.filter(c => c.type === 2).size,
    categories: channels.filter(c => c.type === 4).size,
    threads: guild.channels.cache.filter(c => c.isThread()).size,
    roles: guild.roles.cache.size,
    emojis: guild.emojis.cache.size,
    stickers: guild.stickers.cache.size,
    members: guild.members.cache.size,
    member_count: guild.memberCount,
    me: guild.members.me !== null,
  };
}

client.on(Events.ShardReady, id => emit('shard_ready', { shard: id }));
client.on(Events.ShardResume, id => emit('resumed', { shard: id }));
// Close codes Discord (and the front door) use for "do not reconnect": the
// bot exits 2 at once, as its README says, instead of waiting for
// discord.js's login promise, which under load can settle late.
const FATAL_CLOSES = new Set([4004, 4010, 4011, 4012, 4013, 4014]);
client.on(Events.ShardDisconnect, (ev, id) => {
  emit('disconnect', { shard: id, close_code: ev?.code ?? null });
  if (FATAL_CLOSES.has(ev?.code)) {
    emit('error', { where: 'gateway', shard: id, close_code: ev.code, message: `closed with ${ev.code}` });
    process.exit(2);
  }
});
client.on(Events.ShardError, (err, id) => emit('error', { where: 'shard', shard: id, message: String(err) }));
client.on(Events.Error, err => emit('error', { where: 'client', message: String(err) }));

client.on(Events.ClientReady, c => {
  emit('ready', {
    user_id: c.user.id,
    application_id: c.application?.id ?? null,
    shards: [...c.ws.shards.keys()].sort((a, b) => a - b),
    guilds: [...c.guilds.cache.values()]
      .sort((a, b) => (BigInt(a.id) < BigInt(b.id) ? -1 : 1))
      .map(guildSummary),
  });
});

client.on(Events.MessageCreate, msg => {
  emit('message_create', {
    shard: msg.guild ? msg.guild.shardId : null,
    id: msg.id,
    channel_id: msg.channelId,
    guild_id: msg.guildId,
    author_id: msg.author.id,
    content: msg.content,
  });
});

async function runCommand(cmd) {
  const { op, ref } = cmd;
  try {
    if (op === 'send') {
      const channel = client.channels.cache.get(cmd.channel_id) ?? (await client.channels.fetch(cmd.channel_id));
      const msg = await channel.send(cmd.content);
      emit('sent', { ref, id: msg.id, channel_id: msg.channelId, content: msg.content });
    } else if (op === 'change_presence') {
      const status = cmd.status ?? 'online';
      const activities = cmd.activity ? [{ name: cmd.activity, type: ActivityType.Playing }] : [];
      client.user.setPresence({ status, activities });
      emit('presence_changed', { ref, status, activity: cmd.activity ?? null });
    } else if (op === 'request_members') {
      const guild = client.guilds.cache.get(cmd.guild_id);
      if (!guild) throw new Error(`guild ${cmd.guild_id} is not in the cache`);
      const members = await guild.members.fetch({ time: 15_000 });
      emit('members', { ref, guild_id: guild.id, count: members.size, ids: [...members.keys()].sort() });
    } else {
      throw new Error(`unknown op ${JSON.stringify(op)}`);
    }
  } catch (err) {
    emit('error', { ref, where: op, message: String(err), status: err?.status ?? null });
  }
}

let exiting = false;
async function shutdown(reason) {
  if (exiting) return;
  exiting = true;
  emit('exit', { reason });
  await client.destroy();
  process.exit(0);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', line => {
  line = line.trim();
  if (!line) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    emit('error', { where: 'stdin', message: `bad JSON: ${err.message}` });
    return;
  }
  if (cmd.op === 'exit') {
    shutdown('asked');
    return;
  }
  runCommand(cmd);
});
rl.on('close', () => shutdown('stdin closed'));

emit('starting', { version, shards, shard_count: shardCount });
client.login(token).catch(err => {
  emit('error', { where: 'login', message: String(err), status: err?.status ?? null, code: err?.code ?? null });
  process.exit(2);
});
