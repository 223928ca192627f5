//! What the benchmarks share: the generated MESSAGE_CREATE stream, CPU and
//! memory readings from /proc, and the `RESULT` lines `benches/report.sh`
//! collects.
#![allow(dead_code)]

use std::time::Duration;

use shardwarden::simulator::{Compression, StreamCompressor, message_create_payload_seeded};

/// Size of one generated MESSAGE_CREATE `d` (bytes of JSON before compression).
pub const EVENT_SIZE: usize = 1000;

/// Print one machine-readable figure (`RESULT key value unit`) for the report
/// script, and a readable line for people running one bench by hand.
pub fn result(key: &str, value: f64, unit: &str, what: &str) {
    result_line(key, value, unit);
    eprintln!("  {what:<58} {value:>12.3} {unit}");
}

/// Only the machine-readable line, for a bench that prints its own table.
pub fn result_line(key: &str, value: f64, unit: &str) {
    println!("RESULT {key} {value:.3} {unit}");
}

/// A count from the environment (`BENCH_EVENTS=…`), for quicker or longer runs.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` realistic gateway dispatches, as Discord (and the simulator) frame
/// them: `{"t":"MESSAGE_CREATE","s":N,"op":0,"d":{...}}`, ~1 KB each, ids
/// and content varied by seed.
pub fn messages(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let d = message_create_payload_seeded(0x5eed_0000 + i as u64, EVENT_SIZE);
            format!(
                "{{\"t\":\"MESSAGE_CREATE\",\"s\":{},\"op\":0,\"d\":{d}}}",
                i + 1
            )
        })
        .collect()
}

/// The WebSocket messages one connection would carry: one compression
/// context for the whole stream, one flush per message.
pub fn frames(messages: &[String], kind: Compression) -> Vec<Vec<u8>> {
    let mut c = StreamCompressor::new(kind);
    messages.iter().map(|m| c.compress(m.as_bytes())).collect()
}

/// CPU time the calling thread has used, in ns.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time this process has used, in ns.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the machine.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system, all threads) of another process, in µs, from
/// its process CPU clock (ns resolution); /proc/PID/stat's utime + stime
/// (10 ms ticks) if that clock is not available.
pub fn proc_cpu_us(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes the clock id into `clock`.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } == 0 {
        return clock_ns(clock) as f64 / 1000.0;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (ticks * 1_000_000 / hz) as f64
}

/// A `VmRSS:`/`VmHWM:` style field of /proc/PID/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Median of some samples (sorts them).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Percentile `p` (0–100) of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sleep in small steps until `f` holds or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub mod daemon;

/// The benches' runtime: two workers, like the machine they are measured on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Which named parts of a bench to run: all without arguments, else those
/// named (`cargo bench --bench e2e -- blast`).
pub fn wanted_parts() -> impl Fn(&str) -> bool {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    move |part: &str| args.is_empty() || args.iter().any(|a| a == part)
}
