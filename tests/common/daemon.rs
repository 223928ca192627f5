//! The daemon binary as a child process against the simulator, and bots on
//! its real Unix socket: the harness of the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shardwarden::simulator::{SimConfig, Simulator};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub const TOKEN: &str = "daemon-test-token-7781";
pub const WAIT: Duration = Duration::from_secs(15);
pub const BIN: &str = env!("CARGO_BIN_EXE_shardwarden");

pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bot.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    pub async fn wait_exit(&mut self) -> i32 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start the same daemon again (same config, state and socket).
    pub fn restart(&mut self) {
        self.child = spawn(&self.dir, &self.config, TOKEN);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, sim: &Simulator, extra: &str) -> PathBuf {
    write_config_with(dir, sim, extra, |_| {})
}

/// The test config, changed by `edit` (keys by section, e.g.
/// `t["bot"]["consumer_ttl"]`).
pub fn write_config_with(
    dir: &Path,
    sim: &Simulator,
    extra: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> PathBuf {
    let config = format!(
        r#"
[discord]
token_env = "SW_TEST_TOKEN"
api_base = "{api}"
intents = ["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT"]
events = ["READY", "GUILD_CREATE", "MESSAGE_CREATE"]
compression = "zlib-stream"

[shards]
total = {shards}
identify_reserve = 25

[bot]
socket = "{dir}/bot.sock"
replay_buffer = "{ring}"

[health]
log_interval = "1s"
{health_extra}

[state]
dir = "{dir}/state"
"#,
        api = sim.api_base(),
        shards = sim.config().shards,
        dir = dir.display(),
        ring = if extra.contains("small_ring") {
            "64KiB"
        } else {
            "16MiB"
        },
        health_extra = extra
            .lines()
            .filter(|l| l.contains('='))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let mut table: toml::Table = config.parse().expect("test config parses");
    edit(&mut table);
    let path = dir.join("shardwarden.toml");
    std::fs::write(&path, table.to_string()).expect("write config");
    path
}

pub fn spawn(dir: &Path, config: &Path, token: &str) -> Child {
    spawn_with_env(dir, config, token, &[])
}

pub fn spawn_with_env(dir: &Path, config: &Path, token: &str, env: &[(&str, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .expect("log file");
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("SW_TEST_TOKEN", token)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone"))
        .stderr(log)
        .spawn()
        .expect("spawn daemon")
}

/// A simulator recommending `n` shards, otherwise default.
pub fn shards(n: u32) -> SimConfig {
    SimConfig {
        shards: n,
        ..SimConfig::default()
    }
}

pub async fn start(sim_cfg: SimConfig, extra: &str) -> (Simulator, Daemon, tempfile::TempDir) {
    start_with(sim_cfg, extra, |_| {}).await
}

/// [`start`] with the config changed by `edit`.
pub async fn start_with(
    sim_cfg: SimConfig,
    extra: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> (Simulator, Daemon, tempfile::TempDir) {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        heartbeat_interval_ms: 500,
        ..sim_cfg
    })
    .await
    .expect("simulator");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let config = write_config_with(&dir, &sim, extra, edit);
    let child = spawn(&dir, &config, TOKEN);
    (sim, Daemon { child, dir, config }, tmp)
}

pub struct Bot {
    pub lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    pub write: OwnedWriteHalf,
}

impl Bot {
    pub async fn connect(socket: &Path, hello: Value) -> (Bot, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        };
        let (read, write) = stream.into_split();
        let mut bot = Bot {
            lines: BufReader::new(read).lines(),
            write,
        };
        bot.send(hello).await;
        let welcome = bot.next_op("welcome").await;
        (bot, welcome)
    }

    pub async fn send(&mut self, v: Value) {
        let mut line = v.to_string();
        line.push('\n');
        self.write.write_all(line.as_bytes()).await.expect("write");
    }

    pub async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a line within the wait")
            .expect("read")
            .expect("socket open");
        serde_json::from_str(&line).expect("json line")
    }

    /// The next message with this `op`, within [`WAIT`] (diagnostics
    /// bots get `health` every second, so waiting per line is not enough).
    pub async fn next_op(&mut self, op: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {op} message within {WAIT:?}"
            );
            let v = self.next().await;
            if v["op"] == op {
                return v;
            }
        }
    }

    /// The next `n` dispatches (skipping diagnostics).
    pub async fn dispatches(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self.next().await;
            if v["op"] == "dispatch" {
                out.push(v);
            }
        }
        out
    }
}

pub fn hello(resume_from: Value) -> Value {
    json!({"op":"hello","v":1,"client":"test-bot","events":["*"],"diagnostics":false,"resume_from":resume_from})
}

pub fn cursors(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["cursor"].as_u64().expect("cursor"))
        .collect()
}

pub async fn wait_sim(sim: &Simulator, what: &str, f: impl Fn(&Simulator) -> bool) {
    assert!(
        sim.wait_until(f, WAIT).await,
        "timed out waiting for {what}"
    );
}

pub fn identifies(sim: &Simulator) -> usize {
    sim.frames().iter().filter(|f| f.op == 2).count()
}

pub trait ConnectRetry {
    async fn connect_with_retry(path: &Path) -> UnixStream;
}

impl ConnectRetry for UnixStream {
    async fn connect_with_retry(path: &Path) -> UnixStream {
        for _ in 0..300 {
            if let Ok(s) = UnixStream::connect(path).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no socket at {}", path.display());
    }
}
