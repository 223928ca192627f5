//! The event log: every forwarded dispatch gets a daemon-wide cursor and is
//! kept, as the NDJSON line a bot will read, in a replay ring bounded by bytes.
//!
//! Shards append (a short critical section: number, format, push); bot
//! connections read batches of lines after a cursor. Lines are built once
//! per event and shared by reference count with every bot, so fan-out to
//! several bots costs no per-bot formatting. Cursors in the ring are
//! contiguous, so finding a bot's position is arithmetic, not a search.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

/// Cursors are reserved this many at a time in the state file, so a daemon
/// that crashes (no clean shutdown) never hands out a cursor twice.
pub const CURSOR_LEASE: u64 = 1_000_000;

/// Most ring entries one [`EventLog::read_after`] looks at.
pub const MAX_SCAN: usize = 16 * 1024;

/// Lines are written back to back into chunks of at least this size, each
/// line a reference-counted slice of its chunk, so appending allocates once
/// per chunk rather than twice per event. A chunk is freed when its last
/// line has left the ring and every bot batch; the ring's memory is its
/// byte capacity plus at most about two chunks.
const LINE_CHUNK: usize = 64 * 1024;

/// One held dispatch.
#[derive(Clone)]
pub struct Entry {
    /// Daemon-wide cursor.
    pub cursor: u64,
    /// Shard that received it.
    pub shard: u32,
    /// Discord's sequence number within the shard's session.
    pub seq: u64,
    /// Which session of that shard it belongs to (a per-shard generation
    /// counter, bumped on every READY), for working out what a resume must
    /// redeliver.
    pub session_gen: u32,
    /// Index of `t` in the configured event list (a bot's filter is a bit set
    /// over these indices).
    pub event: u8,
    /// The complete `dispatch` line, `\n` included.
    pub line: Bytes,
}

impl Ring {
    /// Where a reader positioned after cursor `after` goes on: the outcome so
    /// far (a gap when it fell out of the ring) and the index of its next
    /// entry.
    fn position_after(&self, after: u64) -> (ReadOutcome, usize) {
        let oldest = self
            .entries
            .front()
            .map_or(self.next_cursor, |entry| entry.cursor);
        let mut outcome = ReadOutcome { after, gap: None };
        if after + 1 < oldest {
            let missed = events_between(&self.not_missed, after + 1, oldest - 1);
            if missed > 0 {
                outcome.gap = Some((after + 1, oldest - 1, missed));
            }
            outcome.after = oldest - 1;
        }
        let start = (outcome.after + 1 - oldest) as usize;
        (outcome, start)
    }
}

impl Entry {
    /// Discord's `d` as held in the line (line breaks between tokens
    /// removed), sharing the line's memory.
    pub fn d(&self) -> Bytes {
        let start = self
            .line
            .windows(6)
            .position(|w| w == b"\",\"d\":")
            .map_or(self.line.len(), |at| at + 6);
        let end = self.line.len().saturating_sub(2).max(start);
        self.line.slice(start..end)
    }
}

/// What a bot's read found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The cursor the bot is now positioned after (every cursor up to it was
    /// either returned, filtered out or reported as a gap).
    pub after: u64,
    /// Cursors that fell out of the ring before the bot read them:
    /// `(from, to)` inclusive, and how many of them were events (cursors of
    /// an earlier life that were never used, or whose events Discord
    /// redelivered under new cursors, are not). `None` when nothing was lost.
    pub gap: Option<(u64, u64, u64)>,
}

struct Ring {
    /// The cursor the next event gets.
    next_cursor: u64,
    /// The lease asked of the state file (cursors below it).
    leased_until: u64,
    /// Cursors below this are durably leased (written to the state file);
    /// no event gets a cursor at or past it.
    durable_until: u64,
    /// Events refused because the lease could not be written.
    refused: u64,
    /// Cursor ranges of earlier lives that were not events (sorted, merged).
    not_missed: Vec<(u64, u64)>,
    entries: VecDeque<Entry>,
    bytes: usize,
    capacity: usize,
    /// Events evicted from the ring so far (for metrics).
    evicted: u64,
    /// The rest of the chunk the next lines are written into.
    arena: BytesMut,
}

/// The daemon-wide cursor-numbered replay ring.
pub struct EventLog {
    ring: Mutex<Ring>,
    /// The newest cursor, watched by bot connections.
    head: watch::Sender<u64>,
    /// The cursor lease the state file must hold (watched by the persister).
    lease: watch::Sender<u64>,
}

impl EventLog {
    /// A log whose first cursor is `first_cursor` (≥ 1) and whose ring holds
    /// at most `capacity` bytes of lines.
    pub fn new(first_cursor: u64, capacity: usize) -> Self {
        let first_cursor = first_cursor.max(1);
        let (head, _) = watch::channel(first_cursor - 1);
        let (lease, _) = watch::channel(first_cursor + CURSOR_LEASE);
        EventLog {
            ring: Mutex::new(Ring {
                next_cursor: first_cursor,
                leased_until: first_cursor + CURSOR_LEASE,
                durable_until: u64::MAX,
                refused: 0,
                not_missed: Vec::new(),
                entries: VecDeque::new(),
                bytes: 0,
                capacity,
                evicted: 0,
                arena: BytesMut::new(),
            }),
            head,
            lease,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (every
        // mutation is a push or pop), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Only cursors below `until` may be handed out (the lease the state
    /// file durably holds). The daemon sets this after every successful
    /// write; a log made by [`EventLog::new`] has no limit until then.
    pub fn set_durable_until(&self, until: u64) {
        self.lock().durable_until = until;
    }

    /// Cursor ranges (inclusive) of earlier lives that were not events a bot
    /// can miss; `missed` and `gap` leave them out.
    pub fn set_not_missed(&self, ranges: Vec<(u64, u64)>) {
        self.lock().not_missed = ranges;
    }

    /// Events refused so far because the cursor lease was not durable.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    /// How many cursors in `from..=to` were events (cursors in the
    /// not-missed ranges of earlier lives are not).
    pub fn events_between(&self, from: u64, to: u64) -> u64 {
        events_between(&self.lock().not_missed, from, to)
    }

    /// Append one dispatch; returns its cursor, or `None` when the cursor
    /// lease could not be written to the state file and the next cursor is
    /// not durably leased (the event is not forwarded: handing it a cursor
    /// that a restart could hand out again would be worse). `d` is the raw
    /// JSON Discord sent and is copied into the line verbatim.
    pub fn append(
        &self,
        shard: u32,
        seq: u64,
        session_gen: u32,
        event: u8,
        t: &str,
        d: &[u8],
    ) -> Option<u64> {
        // Fixed parts (56 bytes) and three numbers of at most 20 digits.
        let longest = d.len() + t.len() + 56 + 3 * 20;
        let mut ring = self.lock();
        let cursor = ring.next_cursor;
        if cursor >= ring.durable_until {
            ring.refused += 1;
            return None;
        }
        if ring.arena.capacity() < longest {
            ring.arena = BytesMut::with_capacity(longest.max(LINE_CHUNK));
        }
        write_dispatch_line(&mut ring.arena, cursor, shard, seq, t, d);
        ring.next_cursor += 1;
        let line = ring.arena.split().freeze();
        ring.bytes += line.len();
        ring.entries.push_back(Entry {
            cursor,
            shard,
            seq,
            session_gen,
            event,
            line,
        });
        while ring.bytes > ring.capacity && ring.entries.len() > 1 {
            if let Some(old) = ring.entries.pop_front() {
                ring.bytes -= old.line.len();
                ring.evicted += 1;
            }
        }
        // Ask for a new lease well before the old one runs out.
        if ring.next_cursor + CURSOR_LEASE / 2 >= ring.leased_until {
            ring.leased_until = ring.next_cursor + CURSOR_LEASE;
            self.lease.send_replace(ring.leased_until);
        }
        drop(ring);
        self.head.send_replace(cursor);
        Some(cursor)
    }

    /// The newest cursor handed out (0 when none yet).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver that changes whenever a new event is appended.
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// A receiver of the cursor lease the state file must record.
    pub fn subscribe_lease(&self) -> watch::Receiver<u64> {
        self.lease.subscribe()
    }

    /// The cursor the next event will get.
    pub fn next_cursor(&self) -> u64 {
        self.lock().next_cursor
    }

    /// The oldest cursor still held, or `head + 1` when the ring is empty.
    pub fn oldest(&self) -> u64 {
        let ring = self.lock();
        ring.entries
            .front()
            .map_or(ring.next_cursor, |entry| entry.cursor)
    }

    /// The oldest cursor still held, `None` when nothing is held.
    pub fn oldest_held(&self) -> Option<u64> {
        self.lock().entries.front().map(|entry| entry.cursor)
    }

    /// Bytes and events held, and events evicted so far.
    pub fn usage(&self) -> (usize, usize, u64) {
        let ring = self.lock();
        (ring.bytes, ring.entries.len(), ring.evicted)
    }

    /// Copy (by reference count) the lines of events after cursor `after`
    /// that pass `filter` (bit `event` set), up to about `max_bytes`, into
    /// `out`. At most [`MAX_SCAN`] entries are looked at per call, so a bot
    /// with a narrow filter replaying a large ring holds the lock shards
    /// append under only briefly; callers read again until `after` reaches
    /// the head.
    pub fn read_after(
        &self,
        after: u64,
        filter: u128,
        max_bytes: usize,
        out: &mut Vec<Bytes>,
    ) -> ReadOutcome {
        let ring = self.lock();
        let (mut outcome, start) = ring.position_after(after);
        let mut taken = 0usize;
        let entries = ring.entries.range(start.min(ring.entries.len())..);
        for entry in entries.take(MAX_SCAN) {
            if taken >= max_bytes {
                break;
            }
            if filter & (1u128 << entry.event) != 0 {
                taken += entry.line.len();
                out.push(entry.line.clone());
            }
            outcome.after = entry.cursor;
        }
        outcome
    }

    /// Like [`read_after`](Self::read_after) for every event, but the
    /// entries themselves (their lines shared, not copied), for consumers
    /// that need the shard, seq and session of each.
    pub fn entries_after(&self, after: u64, max: usize, out: &mut Vec<Entry>) -> ReadOutcome {
        let ring = self.lock();
        let (mut outcome, start) = ring.position_after(after);
        for entry in ring
            .entries
            .range(start.min(ring.entries.len())..)
            .take(max.min(MAX_SCAN))
        {
            out.push(entry.clone());
            outcome.after = entry.cursor;
        }
        outcome
    }

    /// For every shard, the lowest sequence number of its current session
    /// (`gens[shard]`) that a bot has not acknowledged (cursor > `acked`).
    /// A resume from `that - 1` redelivers exactly the unacknowledged events.
    pub fn lowest_unacked_seq(&self, acked: u64, gens: &[(u32, u32)]) -> Vec<(u32, u64)> {
        // Looked up once per entry, under the lock shards append with: a
        // map, not a scan of every shard.
        let gens: std::collections::HashMap<u32, u32> = gens.iter().copied().collect();
        let mut lowest: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        let ring = self.lock();
        let oldest = ring
            .entries
            .front()
            .map_or(ring.next_cursor, |entry| entry.cursor);
        let start = acked.saturating_add(1).saturating_sub(oldest) as usize;
        for entry in ring.entries.range(start.min(ring.entries.len())..) {
            if gens.get(&entry.shard) != Some(&entry.session_gen) {
                continue;
            }
            lowest
                .entry(entry.shard)
                .and_modify(|seq| *seq = (*seq).min(entry.seq))
                .or_insert(entry.seq);
        }
        drop(ring);
        let mut lowest: Vec<(u32, u64)> = lowest.into_iter().collect();
        lowest.sort_unstable();
        lowest
    }
}

/// Cursors in `from..=to` outside the `not_missed` ranges.
fn events_between(not_missed: &[(u64, u64)], from: u64, to: u64) -> u64 {
    if from > to {
        return 0;
    }
    let skipped: u64 = not_missed
        .iter()
        .map(|&(f, t)| {
            let (f, t) = (f.max(from), t.min(to));
            if f <= t { t - f + 1 } else { 0 }
        })
        .sum();
    (to - from + 1).saturating_sub(skipped)
}

/// `{"op":"dispatch","cursor":C,"shard":S,"seq":Q,"t":"T","d":D}\n`.
/// `t` comes from the configured event list (validated upper-case names), so
/// it needs no escaping.
fn write_dispatch_line(
    out: &mut impl BufMut,
    cursor: u64,
    shard: u32,
    seq: u64,
    t: &str,
    d: &[u8],
) {
    let mut num = itoa_buf();
    out.put_slice(b"{\"op\":\"dispatch\",\"cursor\":");
    out.put_slice(num.format(cursor));
    out.put_slice(b",\"shard\":");
    out.put_slice(num.format(shard as u64));
    out.put_slice(b",\"seq\":");
    out.put_slice(num.format(seq));
    out.put_slice(b",\"t\":\"");
    out.put_slice(t.as_bytes());
    out.put_slice(b"\",\"d\":");
    if d.iter().any(|&b| b == b'\n' || b == b'\r') {
        // JSON may break lines between tokens; the bot protocol is one
        // object per line. Drop whitespace outside strings (inside strings
        // a raw newline cannot occur in valid JSON), keep everything else.
        push_without_line_breaks(out, d);
    } else {
        out.put_slice(d);
    }
    out.put_slice(b"}\n");
}

/// Copy JSON `d` without the whitespace between tokens.
fn push_without_line_breaks(out: &mut impl BufMut, d: &[u8]) {
    let mut in_string = false;
    let mut escaped = false;
    for &b in d {
        if in_string {
            out.put_u8(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.put_u8(b);
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.put_u8(b);
        }
    }
}

/// A small stack buffer for formatting integers without allocating.
struct NumBuf([u8; 20]);

fn itoa_buf() -> NumBuf {
    NumBuf([0; 20])
}

impl NumBuf {
    fn format(&mut self, mut n: u64) -> &[u8] {
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &self.0[i..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[Bytes]) -> Vec<serde_json::Value> {
        out.iter()
            .map(|l| serde_json::from_slice(l).expect("valid json line"))
            .collect()
    }

    #[test]
    fn dispatch_line_is_valid_json_with_raw_d() {
        let log = EventLog::new(1, 1 << 20);
        let d = br#"{"content":"hi \"there\"","id":"1"}"#;
        let cursor = log.append(3, 678, 1, 0, "MESSAGE_CREATE", d);
        assert_eq!(cursor, Some(1));
        let mut out = Vec::new();
        log.read_after(0, u128::MAX, usize::MAX, &mut out);
        let v = &lines(&out)[0];
        assert_eq!(v["op"], "dispatch");
        assert_eq!(v["cursor"], 1);
        assert_eq!(v["shard"], 3);
        assert_eq!(v["seq"], 678);
        assert_eq!(v["t"], "MESSAGE_CREATE");
        assert_eq!(v["d"]["content"], "hi \"there\"");
        assert!(out[0].ends_with(b"}\n"));
        assert!(
            out[0].windows(d.len()).any(|w| w == d),
            "d is copied verbatim"
        );
    }

    #[test]
    fn multi_line_d_becomes_one_line_with_strings_intact() {
        let log = EventLog::new(1, 1 << 20);
        let d = b"{\n  \"content\": \"a b\\\" \\n c\",\r\n  \"n\": [1, 2]\n}";
        log.append(0, 1, 1, 0, "MESSAGE_CREATE", d);
        let mut out = Vec::new();
        log.read_after(0, u128::MAX, usize::MAX, &mut out);
        assert_eq!(
            out[0].iter().filter(|&&b| b == b'\n').count(),
            1,
            "one line"
        );
        let v = &lines(&out)[0];
        let original: serde_json::Value = serde_json::from_slice(d).expect("valid");
        assert_eq!(v["d"], original);
        assert_eq!(v["d"]["content"], "a b\" \n c");
    }

    #[test]
    fn lines_stay_intact_across_chunks_and_evictions() {
        let log = EventLog::new(1, 300 * 1024);
        let small = format!("{{\"x\":\"{}\"}}", "a".repeat(1000));
        let huge = format!("{{\"x\":\"{}\"}}", "b".repeat(3 * LINE_CHUNK));
        for seq in 1..=400u64 {
            let d = if seq.is_multiple_of(97) {
                &huge
            } else {
                &small
            };
            log.append(0, seq, 1, 0, "MESSAGE_CREATE", d.as_bytes());
        }
        let mut out = Vec::new();
        log.read_after(0, u128::MAX, usize::MAX, &mut out);
        let oldest = log.oldest();
        for (i, v) in lines(&out).iter().enumerate() {
            let cursor = oldest + i as u64;
            assert_eq!(v["cursor"], cursor);
            assert_eq!(v["seq"], cursor);
            let want = if cursor.is_multiple_of(97) {
                &huge
            } else {
                &small
            };
            assert_eq!(v["d"]["x"].as_str().map(str::len), Some(want.len() - 8));
        }
        assert_eq!(out.len() as u64, 400 - oldest + 1);
    }

    #[test]
    fn cursors_are_strictly_increasing_and_continue_from_start() {
        let log = EventLog::new(500, 1 << 20);
        let a = log.append(0, 1, 1, 0, "READY", b"{}");
        let b = log.append(1, 1, 1, 0, "READY", b"{}");
        assert_eq!((a, b), (Some(500), Some(501)));
        assert_eq!(log.head(), 501);
        assert_eq!(log.oldest(), 500);
    }

    #[test]
    fn ring_evicts_by_bytes_and_reports_exact_gap() {
        let log = EventLog::new(1, 1000);
        for seq in 1..=100 {
            log.append(0, seq, 1, 0, "MESSAGE_CREATE", b"{\"x\":1}");
        }
        let (bytes, held, evicted) = log.usage();
        assert!(bytes <= 1000);
        assert_eq!(held as u64 + evicted, 100);
        let oldest = log.oldest();
        assert!(oldest > 1);
        let mut out = Vec::new();
        let outcome = log.read_after(5, u128::MAX, usize::MAX, &mut out);
        assert_eq!(outcome.gap, Some((6, oldest - 1, oldest - 6)));
        assert_eq!(outcome.after, 100);
        let got = lines(&out);
        assert_eq!(got.len(), held);
        assert_eq!(got[0]["cursor"], oldest);
    }

    #[test]
    fn entries_carry_their_raw_d() {
        let log = EventLog::new(1, 1 << 20);
        log.append(2, 7, 1, 0, "MESSAGE_CREATE", b"{\"a\":{\"d\":1}}");
        let mut out = Vec::new();
        let outcome = log.entries_after(0, 10, &mut out);
        assert_eq!((outcome.after, out.len()), (1, 1));
        assert_eq!((out[0].shard, out[0].seq), (2, 7));
        assert_eq!(&out[0].d()[..], b"{\"a\":{\"d\":1}}");
    }

    #[test]
    fn no_cursor_past_the_durable_lease() {
        let log = EventLog::new(10, 1 << 20);
        log.set_durable_until(12);
        assert_eq!(log.append(0, 1, 1, 0, "MESSAGE_CREATE", b"{}"), Some(10));
        assert_eq!(log.append(0, 2, 1, 0, "MESSAGE_CREATE", b"{}"), Some(11));
        assert_eq!(log.append(0, 3, 1, 0, "MESSAGE_CREATE", b"{}"), None);
        assert_eq!((log.head(), log.refused()), (11, 1));
        // The lease is written: forwarding goes on with the next cursor.
        log.set_durable_until(20);
        assert_eq!(log.append(0, 4, 1, 0, "MESSAGE_CREATE", b"{}"), Some(12));
    }

    #[test]
    fn cursors_of_earlier_lives_that_were_not_events_are_not_missed() {
        // Life 1 used 1..=40; the bot acked 30; the sessions resumed from 30,
        // so Discord redelivered 31..=40 under new cursors; a crash had
        // leased up to 1000, so 41..=999 were never used.
        let log = EventLog::new(1000, 1 << 20);
        log.set_not_missed(vec![(31, 999)]);
        for seq in 1..=5 {
            log.append(0, seq, 1, 0, "MESSAGE_CREATE", b"{}");
        }
        let mut out = Vec::new();
        let caught_up = log.read_after(30, u128::MAX, usize::MAX, &mut out);
        assert_eq!((caught_up.gap, out.len()), (None, 5));
        assert_eq!(log.events_between(31, 999), 0);
        // A bot that had only finished 20 lost 21..=30 for real.
        out.clear();
        let behind = log.read_after(20, u128::MAX, usize::MAX, &mut out);
        assert_eq!(behind.gap, Some((21, 999, 10)));
        assert_eq!(log.events_between(21, 999), 10);
    }

    #[test]
    fn filter_skips_events_but_advances_position() {
        let log = EventLog::new(1, 1 << 20);
        log.append(0, 1, 1, 0, "GUILD_CREATE", b"{}");
        log.append(0, 2, 1, 1, "MESSAGE_CREATE", b"{}");
        log.append(0, 3, 1, 0, "GUILD_CREATE", b"{}");
        let mut out = Vec::new();
        let outcome = log.read_after(0, 1 << 1, usize::MAX, &mut out);
        assert_eq!(outcome.after, 3);
        let got = lines(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["t"], "MESSAGE_CREATE");
    }

    #[test]
    fn read_scans_a_bounded_number_of_entries() {
        let log = EventLog::new(1, 64 << 20);
        let total = MAX_SCAN as u64 * 2 + 10;
        for seq in 1..=total {
            log.append(0, seq, 1, 0, "GUILD_CREATE", b"{}");
        }
        let mut out = Vec::new();
        let first = log.read_after(0, 1 << 1, usize::MAX, &mut out);
        assert_eq!((first.after, out.len()), (MAX_SCAN as u64, 0));
        let mut after = first.after;
        while after < total {
            after = log.read_after(after, 1 << 1, usize::MAX, &mut out).after;
        }
        assert!(out.is_empty());
    }

    #[test]
    fn read_respects_batch_size() {
        let log = EventLog::new(1, 1 << 20);
        for seq in 1..=10 {
            log.append(0, seq, 1, 0, "MESSAGE_CREATE", b"{}");
        }
        let mut out = Vec::new();
        let first = log.read_after(0, u128::MAX, 1, &mut out);
        assert_eq!((first.after, out.len()), (1, 1));
        let second = log.read_after(first.after, u128::MAX, usize::MAX, &mut out);
        assert_eq!((second.after, out.len()), (10, 10));
    }

    #[test]
    fn lowest_unacked_seq_per_shard_ignores_old_sessions() {
        let log = EventLog::new(1, 1 << 20);
        log.append(0, 7, 1, 0, "MESSAGE_CREATE", b"{}"); // cursor 1, old session of shard 0
        log.append(0, 1, 2, 0, "READY", b"{}"); // 2
        log.append(1, 40, 1, 0, "MESSAGE_CREATE", b"{}"); // 3
        log.append(0, 2, 2, 0, "MESSAGE_CREATE", b"{}"); // 4
        log.append(1, 41, 1, 0, "MESSAGE_CREATE", b"{}"); // 5
        let gens = [(0, 2), (1, 1)];
        let mut got = log.lowest_unacked_seq(0, &gens);
        got.sort();
        assert_eq!(got, vec![(0, 1), (1, 40)]);
        let mut got = log.lowest_unacked_seq(3, &gens);
        got.sort();
        assert_eq!(got, vec![(0, 2), (1, 41)]);
        assert!(log.lowest_unacked_seq(5, &gens).is_empty());
    }

    #[test]
    fn entries_after_reads_everything_in_order_and_reports_gaps() {
        let log = EventLog::new(1, 1000);
        for seq in 1..=100 {
            log.append(
                (seq % 2) as u32,
                seq,
                1,
                (seq % 3) as u8,
                "MESSAGE_CREATE",
                b"{}",
            );
        }
        let oldest = log.oldest();
        let mut out = Vec::new();
        let outcome = log.entries_after(0, 5, &mut out);
        assert_eq!(outcome.gap, Some((1, oldest - 1, oldest - 1)));
        assert_eq!(outcome.after, oldest + 4);
        let cursors: Vec<u64> = out.iter().map(|e| e.cursor).collect();
        assert_eq!(cursors, (oldest..oldest + 5).collect::<Vec<_>>());
        assert_eq!(out[0].shard, (oldest % 2) as u32);
        out.clear();
        let outcome = log.entries_after(100, 5, &mut out);
        assert_eq!((outcome.after, outcome.gap, out.len()), (100, None, 0));
    }

    #[test]
    fn lease_moves_ahead_of_cursors() {
        let log = EventLog::new(1, 100);
        let lease = log.subscribe_lease();
        assert!(*lease.borrow() > log.next_cursor());
    }
}
