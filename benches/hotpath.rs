//! Benchmarks 1 and 2 of issue 5, in one process and interleaved so that
//! their ratio survives the drift of a shared machine:
//!
//! - **floor**: the least any consumer must do with the same bytes: one
//!   `flate2::Decompress` over the zlib-stream, then `op`/`t`/`s` read from
//!   each message (serde with `d` as a borrowed `RawValue`, which still has to
//!   scan `d` to find where the envelope ends).
//! - **hot path**: shardwarden's own pieces in the order `Shard::run_connection`
//!   uses them: `Inflater::push` → `Envelope::parse` → the dispatch branch of
//!   `handle_payload` (stats atomics, event index) → `EventLog::append` → a
//!   bot batch (`read_after` into a reused `Vec<Bytes>`, lines copied into a
//!   reused output buffer, as the bot server's writer gathers them), for
//!   zlib-stream, zstd-stream and none (text frames skip the inflater, as in
//!   `run_connection`).
//!
//! Times are the bench thread's CPU time (CLOCK_THREAD_CPUTIME_ID), median of
//! several rounds. A counting allocator reports heap allocations per event.
//! `BENCH_EVENTS` (default 20000) and `BENCH_ROUNDS` (default 7) tune it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flate2::{Decompress, FlushDecompress, Status};
use serde::Deserialize;
use serde_json::value::RawValue;
use shardwarden::compression::{Compression, Inflater};
use shardwarden::envelope::Envelope;
use shardwarden::event_log::EventLog;
use shardwarden::simulator::Compression as Wire;

use common::{env_count, frames, median, messages, result, thread_cpu_ns};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Events a bot batch holds at this rate of reading (the bot server reads
/// whatever accumulated since its last wake-up; at full speed that is tens).
const BOT_BATCH: usize = 32;
/// The bot server's batch limit.
const BATCH_BYTES: usize = 256 * 1024;
/// Replay ring of the in-process hot path: smaller than the stream, so
/// eviction is part of the steady state.
const RING: usize = 8 << 20;

#[derive(Deserialize)]
struct Minimal<'a> {
    op: u8,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default, borrow)]
    t: Option<&'a str>,
    #[serde(default, borrow)]
    #[allow(dead_code)]
    d: Option<&'a RawValue>,
}

/// One measured pass: CPU ns per event, allocations per event, and a
/// checksum so nothing is optimised away.
struct Pass {
    ns: f64,
    allocs: f64,
    check: u64,
}

fn measure(n: usize, f: impl FnOnce() -> u64) -> Pass {
    let a0 = ALLOCS.load(Ordering::Relaxed);
    let t0 = thread_cpu_ns();
    let check = f();
    let t1 = thread_cpu_ns();
    let a1 = ALLOCS.load(Ordering::Relaxed);
    Pass {
        ns: (t1 - t0) as f64 / n as f64,
        allocs: (a1 - a0) as f64 / n as f64,
        check,
    }
}

/// Inflate one sync-flushed message into `out` (cleared first).
fn inflate(z: &mut Decompress, mut input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(4096));
        }
        let before = z.total_in();
        let status = z
            .decompress_vec(input, out, FlushDecompress::Sync)
            .expect("valid stream");
        input = &input[(z.total_in() - before) as usize..];
        if status == Status::StreamEnd || (input.is_empty() && out.len() < out.capacity()) {
            return;
        }
    }
}

/// The floor: inflate + read op/t/s.
fn floor(frames: &[Vec<u8>], read_envelope: bool) -> u64 {
    let mut z = Decompress::new(true);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut check = 0u64;
    for frame in frames {
        inflate(&mut z, frame, &mut out);
        if read_envelope {
            let m: Minimal = serde_json::from_slice(&out).expect("envelope");
            check = check
                .wrapping_add(m.s.unwrap_or(0))
                .wrapping_add(u64::from(m.op))
                .wrapping_add(m.t.map_or(0, str::len) as u64);
        } else {
            check = check.wrapping_add(out.len() as u64);
        }
    }
    check
}

/// How far down the hot path one pass goes (a cheap per-stage profile).
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Stage {
    Inflate,
    Parse,
    Append,
    Deliver,
}

/// What `handle_payload` keeps per shard.
#[derive(Default)]
struct Stats {
    bytes: AtomicU64,
    seq: AtomicU64,
    events: AtomicU64,
    forwarded: AtomicU64,
    session_gen: std::sync::atomic::AtomicU32,
}

fn hot_path(frames: &[Vec<u8>], compression: Compression, stage: Stage) -> u64 {
    let log = EventLog::new(1, RING);
    let events: Vec<String> = ["READY", "RESUMED", "GUILD_CREATE", "MESSAGE_CREATE"]
        .iter()
        .map(|e| e.to_string())
        .collect();
    let stats = Stats::default();
    let mut inflater = Inflater::new(compression).expect("inflater");
    let mut buf: Vec<u8> = Vec::new();
    let mut lines: Vec<Bytes> = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(BATCH_BYTES + 64 * 1024);
    let mut position = 0u64;
    let mut check = 0u64;
    for (i, frame) in frames.iter().enumerate() {
        // run_connection: binary frames go through the inflater; text frames
        // (compression none) go to handle_payload as they are.
        let payload: &[u8] = if compression == Compression::None {
            frame
        } else {
            if !inflater.push(frame, &mut buf).expect("inflates") {
                continue;
            }
            &buf
        };
        if stage == Stage::Inflate {
            check = check.wrapping_add(payload.len() as u64);
            continue;
        }
        stats
            .bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let envelope = Envelope::parse(payload).expect("envelope");
        if stage == Stage::Parse {
            check = check.wrapping_add(envelope.s.unwrap_or(0));
            continue;
        }
        if envelope.op == 0 {
            let mut seq = 0;
            if let Some(s) = envelope.s {
                seq = s;
                stats.seq.store(s, Ordering::Relaxed);
            }
            stats.events.fetch_add(1, Ordering::Relaxed);
            let t = envelope.t.as_deref().unwrap_or("");
            if let Some(index) = events.iter().position(|e| e == t) {
                let generation = stats.session_gen.load(Ordering::Relaxed);
                log.append(
                    0,
                    seq,
                    generation,
                    index as u8,
                    t,
                    envelope.raw_d().as_bytes(),
                );
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        if stage == Stage::Deliver && (i + 1) % BOT_BATCH == 0 {
            let outcome = log.read_after(position, u128::MAX, BATCH_BYTES, &mut lines);
            for line in lines.drain(..) {
                out.extend_from_slice(&line);
            }
            position = outcome.after;
            check = check.wrapping_add(out.len() as u64);
            out.clear();
        }
    }
    check.wrapping_add(log.head())
}

fn main() {
    let n = env_count("BENCH_EVENTS", 20_000);
    let rounds = env_count("BENCH_ROUNDS", 7).max(1);
    eprintln!("hotpath: generating {n} MESSAGE_CREATE dispatches of ~1 KB");
    let msgs = messages(n);
    let zlib = frames(&msgs, Wire::ZlibStream);
    let zstd = frames(&msgs, Wire::ZstdStream);
    let none = frames(&msgs, Wire::None);
    let wire = |f: &[Vec<u8>]| f.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    let raw = msgs.iter().map(String::len).sum::<usize>() as f64 / n as f64;
    eprintln!(
        "  bytes/event: json {raw:.0}, zlib-stream {:.0}, zstd-stream {:.0}",
        wire(&zlib),
        wire(&zstd)
    );

    type Case<'a> = (&'a str, &'a str, Box<dyn Fn() -> u64 + 'a>);
    let cases: Vec<Case> = vec![
        (
            "floor_ns",
            "floor: zlib inflate + op/t/s (ns/event)",
            Box::new(|| floor(&zlib, true)),
        ),
        (
            "floor_inflate_only_ns",
            "  of which inflate alone (ns/event)",
            Box::new(|| floor(&zlib, false)),
        ),
        (
            "hot_zlib_ns",
            "hot path zlib-stream (ns/event)",
            Box::new(|| hot_path(&zlib, Compression::ZlibStream, Stage::Deliver)),
        ),
        (
            "hot_zlib_inflate_ns",
            "  stage: Inflater::push only (ns/event)",
            Box::new(|| hot_path(&zlib, Compression::ZlibStream, Stage::Inflate)),
        ),
        (
            "hot_zlib_parse_ns",
            "  stage: + Envelope::parse (ns/event)",
            Box::new(|| hot_path(&zlib, Compression::ZlibStream, Stage::Parse)),
        ),
        (
            "hot_zlib_append_ns",
            "  stage: + EventLog::append (ns/event)",
            Box::new(|| hot_path(&zlib, Compression::ZlibStream, Stage::Append)),
        ),
        (
            "hot_zstd_ns",
            "hot path zstd-stream (ns/event)",
            Box::new(|| hot_path(&zstd, Compression::ZstdStream, Stage::Deliver)),
        ),
        (
            "hot_none_ns",
            "hot path none (ns/event)",
            Box::new(|| hot_path(&none, Compression::None, Stage::Deliver)),
        ),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut allocs: Vec<f64> = vec![0.0; cases.len()];
    let mut checks: Vec<u64> = vec![0; cases.len()];
    // Warm-up round (page faults, caches), then interleaved rounds.
    for (_, _, f) in &cases {
        std::hint::black_box(f());
    }
    for _ in 0..rounds {
        for (i, (_, _, f)) in cases.iter().enumerate() {
            let pass = measure(n, f);
            samples[i].push(pass.ns);
            allocs[i] = pass.allocs;
            checks[i] = checks[i].wrapping_add(pass.check);
        }
    }
    std::hint::black_box(&checks);
    let floor_ns = median(&mut samples[0].clone());
    for (i, (key, what, _)) in cases.iter().enumerate() {
        let v = median(&mut samples[i]);
        result(key, v, "ns", what);
        if matches!(*key, "hot_zlib_ns" | "hot_zstd_ns" | "hot_none_ns") {
            result(
                &key.replace("_ns", "_ratio"),
                v / floor_ns,
                "x",
                "  ratio to floor",
            );
        }
    }
    for (i, (key, _, _)) in cases.iter().enumerate() {
        {
            result(
                &key.replace("_ns", "_allocs"),
                allocs[i],
                "allocs",
                &format!("heap allocations per event ({key})"),
            );
        }
    }
}
