#!/usr/bin/env node
// Example shardwarden bot client (Node.js 20, standard library only).
//
// Connects to the daemon's Unix socket, resumes from the cursor saved in a
// file, prints every event as "cursor shard t", acknowledges every N events
// and saves the cursor (atomically) after each acknowledgement. Ctrl-C /
// SIGTERM stop it cleanly: it acknowledges what it has handled, saves the
// cursor and exits 0. When the daemon says `closing` (a clean stop or
// restart) the bot waits for it to come back and reconnects from its cursor,
// quietly; a connection that ends without `closing` (the daemon crashed)
// exits 1, so its supervisor notices.
//
//   node bot.js [SOCKET] [--cursor-file F] [--ack-every N] [--events A,B]
//               [--max-events N]
//
// SOCKET defaults to $SHARDWARDEN_SOCKET, then /run/shardwarden/bot.sock.
'use strict';
const fs = require('node:fs');
const net = require('node:net');
const readline = require('node:readline');
const { parseArgs } = require('node:util');

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'cursor-file': { type: 'string', default: 'bot.cursor' },
    'ack-every': { type: 'string', default: '100' },
    events: { type: 'string', default: '*' },
    'max-events': { type: 'string', default: '0' }, // 0 = never stop
  },
});
const socketPath =
  positionals[0] ?? process.env.SHARDWARDEN_SOCKET ?? '/run/shardwarden/bot.sock';
const cursorFile = opts['cursor-file'];
const ackEvery = Number(opts['ack-every']);
const maxEvents = Number(opts['max-events']);

// The last cursor this bot finished with; 0 (everything held) on first start.
function readCursor() {
  try {
    return Number(fs.readFileSync(cursorFile, 'utf8').trim() || 0);
  } catch (e) {
    if (e.code === 'ENOENT') return 0;
    throw e;
  }
}

// Write to a temporary file and rename it over the old one, so a crash leaves
// either the old cursor or the new one, never a torn file.
function saveCursor(cursor) {
  const tmp = `${cursorFile}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  fs.writeSync(fd, `${cursor}\n`);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(tmp, cursorFile);
}

const resumeFrom = readCursor();
let handled = resumeFrom; // newest cursor handled
let acked = resumeFrom; // newest cursor acknowledged
let count = 0; // dispatches handled
let welcomed = false;
let stopping = false;
let closing = null; // the daemon's `closing` message on this connection
let sock = null;
const send = (msg) => sock.write(JSON.stringify(msg) + '\n');

function ack() {
  if (handled > acked) {
    if (sock.writable) send({ op: 'ack', cursor: handled });
    saveCursor(handled);
    acked = handled;
  }
}

function stop(status) {
  if (stopping) return;
  stopping = true;
  ack();
  sock.end(() => process.exit(status));
  setTimeout(() => process.exit(status), 2000).unref(); // daemon not reading
}

function handle(msg) {
  switch (msg.op) {
    case 'dispatch':
      // Your bot's logic goes here. msg.d is the event exactly as Discord
      // sent it. Delivery is at-least-once: after a restart some events come
      // again; (shard, seq) within a session spots repeats.
      console.log(`${msg.cursor} ${msg.shard} ${msg.t}`);
      handled = msg.cursor;
      count += 1;
      if (count % ackEvery === 0) ack();
      if (maxEvents && count >= maxEvents) stop(0);
      break;
    case 'welcome':
      welcomed = true;
      console.log(`welcome shards=${JSON.stringify(msg.shards)} shard_total=${msg.shard_total}` +
        ` head=${msg.head} oldest=${msg.oldest} missed=${msg.missed}`);
      if (msg.missed) {
        console.error(`warning: ${msg.missed} events after cursor ${acked}` +
          ' are no longer held and will not be delivered');
      }
      ack(); // after a reconnect: what was handled since the last ack
      break;
    case 'session': {
      const extra = ['class', 'close_code', 'seq']
        .filter((k) => k in msg).map((k) => ` ${k}=${msg[k]}`).join('');
      console.log(`session shard=${msg.shard} event=${msg.event}${extra}` +
        ` detail=${msg.detail ?? ''}`);
      break;
    }
    case 'health': {
      const states = msg.shards.map((s) => `${s.shard}:${s.state}`).join(',');
      const budget = msg.identify_budget ?? {};
      console.log(`health shards=${states} identify_budget=${budget.remaining}/${budget.total}`);
      break;
    }
    case 'incident':
      // A suspected Discord-side outage (or its end), daemon-wide.
      console.log(`incident state=${msg.state} shards=${JSON.stringify(msg.shards)}` +
        ` detail=${msg.detail ?? ''}`);
      break;
    case 'closing':
      // The daemon closes this connection on purpose (a stop or a restart);
      // the end of the connection that follows is expected.
      closing = msg;
      break;
    case 'gap':
      // Events this bot fell too far behind to receive; they are gone.
      console.log(`gap from=${msg.from} to=${msg.to} missed=${msg.missed}`);
      break;
    case 'error':
      console.error(`error code=${msg.code}${msg.id ? ` id=${msg.id}` : ''} message=${msg.message}`);
      if (!welcomed) stop(1); // the hello was refused; fix the arguments
      break;
  }
}

// Connect; with `retry`, keep trying until the daemon is back.
let delay = 200;
function connect(retry) {
  const s = net.createConnection(socketPath);
  sock = s;
  let opened = false;
  s.on('connect', () => {
    opened = true;
    delay = 200;
    send({
      op: 'hello', v: 1, client: 'example-node', events: opts.events.split(','),
      diagnostics: true, resume_from: handled,
    });
  });
  s.on('error', (e) => {
    if (closing || (retry && !opened)) return; // 'close' reconnects
    console.error(`cannot talk to ${socketPath}: ${e.message}`);
    if (handled > acked) saveCursor(handled); // still remember what was handled
    process.exit(1);
  });
  readline.createInterface({ input: s }).on('line', (line) => {
    if (line.trim() && !stopping) handle(JSON.parse(line));
  });
  s.on('close', () => {
    if (stopping) return;
    if (opened && !closing) {
      console.error('the daemon closed the connection without saying why (did it crash?)');
      stop(1);
      return;
    }
    if (closing) {
      // A clean daemon stop or restart: remember what was handled, wait for
      // the daemon to come back, and go on from the cursor.
      console.log(`daemon closing (${closing.reason}): reconnecting`);
      saveCursor(handled);
      closing = null;
      welcomed = false;
    }
    setTimeout(() => connect(true), delay);
    delay = Math.min(delay * 2, 5000);
  });
}

connect(false);
process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));
