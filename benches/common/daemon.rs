//! The release `shardwarden` binary as a child process against an in-process
//! simulator (as tests/daemon.rs runs it), and a bot on its Unix socket that
//! reads raw bytes and splits lines, doing as little as a bot can.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shardwarden::simulator::{SimConfig, Simulator};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

pub const TOKEN: &str = "bench-token-0000";
const BIN: &str = env!("CARGO_BIN_EXE_shardwarden");

/// A simulator for `shards` shards whose identify pacing allows them all at
/// once (`max_concurrency = shards`) unless told otherwise.
pub async fn simulator(shards: u32, tweak: impl FnOnce(&mut SimConfig)) -> Simulator {
    let mut cfg = SimConfig {
        token: TOKEN.to_string(),
        shards,
        max_concurrency: shards.max(1),
        session_start_total: 100_000,
        session_start_remaining: 100_000,
        guilds_per_shard: 1,
        ..SimConfig::default()
    };
    tweak(&mut cfg);
    Simulator::start(cfg).await.expect("simulator starts")
}

/// A TCP port on loopback free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The daemon as a child process.
pub struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Start `shardwarden run` for all of the simulator's shards, with a
    /// replay ring of `ring` (e.g. "16MiB") and zlib-stream.
    pub fn start(sim: &Simulator, ring: &str) -> Daemon {
        Self::start_with(sim, ring, "zlib-stream")
    }

    pub fn start_with(sim: &Simulator, ring: &str, compression: &str) -> Daemon {
        Self::start_full(
            sim,
            ring,
            compression,
            r#"["READY", "GUILD_CREATE", "MESSAGE_CREATE"]"#,
            "",
        )
    }

    /// Any `events` list and extra TOML (e.g. a `[proxy]` section).
    pub fn start_full(
        sim: &Simulator,
        ring: &str,
        compression: &str,
        events: &str,
        extra: &str,
    ) -> Daemon {
        Self::start_intents(
            sim,
            ring,
            compression,
            r#"["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT"]"#,
            events,
            extra,
        )
    }

    /// Any `intents` list too (TOML array of intent names).
    pub fn start_intents(
        sim: &Simulator,
        ring: &str,
        compression: &str,
        intents: &str,
        events: &str,
        extra: &str,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path();
        let config = format!(
            r#"
[discord]
token_env = "SW_BENCH_TOKEN"
api_base = "{api}"
intents = {intents}
events = {events}
compression = "{compression}"

[shards]
total = {shards}
identify_reserve = 25

[bot]
socket = "{dir}/bot.sock"
replay_buffer = "{ring}"

[health]
log_interval = "60s"

[state]
dir = "{dir}/state"

{extra}
"#,
            api = sim.api_base(),
            shards = sim.config().shards,
            dir = path.display(),
        );
        let config_path = path.join("shardwarden.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = path.join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("SW_BENCH_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file)
            .spawn()
            .expect("spawn the release daemon");
        Daemon {
            child,
            socket: path.join("bot.sock"),
            _dir: dir,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bot on the daemon's socket. Blocking I/O: run it on a thread of its
/// own (`spawn_blocking`) so it never waits behind the simulator's tasks.
pub struct Bot {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of `buf` read and not yet handed out.
    filled: usize,
    /// read(2) calls that returned data (how well the daemon batches).
    pub reads: u64,
    /// Dispatches lost to `gap` lines (the bot fell out of the ring).
    pub missed: u64,
}

impl Bot {
    /// Connect (retrying while the daemon starts), say hello with
    /// `resume_from` (JSON: `null`, `0` or a cursor) and read `welcome`.
    pub fn connect(socket: &Path, resume_from: &str) -> Bot {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("cannot connect to {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut bot = Bot {
            stream,
            buf: vec![0; 1 << 20],
            filled: 0,
            reads: 0,
            missed: 0,
        };
        bot.send_hello(resume_from);
        let mut welcomed = false;
        bot.lines(|line, _| {
            welcomed = contains(line, b"\"op\":\"welcome\"");
            !welcomed
        });
        assert!(welcomed, "daemon answered hello with something else");
        bot
    }

    fn send_hello(&mut self, resume_from: &str) {
        let hello = format!(
            "{{\"op\":\"hello\",\"v\":1,\"client\":\"bench-bot\",\"events\":[\"*\"],\"diagnostics\":false,\"resume_from\":{resume_from}}}\n"
        );
        self.stream.write_all(hello.as_bytes()).expect("send hello");
    }

    /// Feed every complete line (without `\n`) and the CLOCK_MONOTONIC time
    /// of the read that brought it to `f` until `f` returns false; lines
    /// after that one stay buffered for the next call.
    pub fn lines(&mut self, mut f: impl FnMut(&[u8], u64) -> bool) {
        let mut at = super::mono_ns();
        loop {
            let mut start = 0;
            let mut go_on = true;
            while let Some(nl) = self.buf[start..self.filled]
                .iter()
                .position(|&b| b == b'\n')
            {
                go_on = f(&self.buf[start..start + nl], at);
                start += nl + 1;
                if !go_on {
                    break;
                }
            }
            self.buf.copy_within(start..self.filled, 0);
            self.filled -= start;
            if !go_on {
                return;
            }
            if self.filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self
                .stream
                .read(&mut self.buf[self.filled..])
                .expect("daemon sends within 60 s");
            assert!(n > 0, "daemon closed the bot connection");
            at = super::mono_ns();
            self.reads += 1;
            self.filled += n;
        }
    }

    /// Read until `n` dispatch lines whose `t` is `t` have arrived; returns
    /// the cursor of the last line read.
    pub fn count(&mut self, t: &str, n: usize) -> u64 {
        let needle = format!("\"t\":\"{t}\"");
        let mut seen = 0;
        let mut last = 0;
        let mut missed = 0;
        if n == 0 {
            return 0;
        }
        self.lines(|line, _| {
            let head = &line[..line.len().min(96)];
            if contains(head, needle.as_bytes()) {
                seen += 1;
            } else if contains(head, b"\"op\":\"gap\"") {
                // Counted as arrived so the blast ends; reported as missed.
                let lost = number_after(line, b"\"missed\":");
                missed += lost;
                seen += lost as usize;
            }
            if seen >= n {
                last = cursor_of(line);
            }
            seen < n
        });
        self.missed += missed;
        last
    }
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The `cursor` of a dispatch line (0 if none).
pub fn cursor_of(line: &[u8]) -> u64 {
    number_after(line, b"\"cursor\":")
}

/// The unsigned integer right after the first `key` in `line` (0 if none).
pub fn number_after(line: &[u8], key: &[u8]) -> u64 {
    let Some(at) = line.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    line[at + key.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'))
}
