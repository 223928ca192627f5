//! The real-library bots of tests/dropin/ (discord.py and discord.js) as child processes:
//! their stdout JSON events and stdin commands (tests/dropin/README.md). Used by
//! tests/libraries.rs (against the bare simulator) and tests/dropin.rs (through the
//! daemon's front door).
//!
//! The libraries are installed by `tests/dropin/setup.sh` (called by `.ci/run`). Without
//! them a test is skipped with a printed reason, except under `CI`, where their absence
//! fails.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lib {
    DiscordPy,
    DiscordJs,
}

pub fn dropin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dropin")
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The command that runs the library's bot, or why it cannot run.
pub fn bot_command(lib: Lib) -> Result<Command, String> {
    let dir = dropin_dir();
    match lib {
        Lib::DiscordPy => {
            let python = dir.join(".venv/bin/python");
            if !python.exists() {
                return Err(format!(
                    "{} is missing (run tests/dropin/setup.sh)",
                    python.display()
                ));
            }
            let mut c = Command::new(python);
            c.arg(dir.join("python/bot.py"));
            Ok(c)
        }
        Lib::DiscordJs => {
            let module = dir.join("node/node_modules/discord.js/package.json");
            if !module.exists() {
                return Err(format!(
                    "{} is missing (run tests/dropin/setup.sh)",
                    module.display()
                ));
            }
            let node_ok = std::process::Command::new("node")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !node_ok {
                return Err("node is not on PATH".to_string());
            }
            let mut c = Command::new("node");
            c.arg(dir.join("node/bot.js"));
            Ok(c)
        }
    }
}

/// The bot's command; `None` (after saying why) when the library is not installed and
/// `CI` is not set. Under `CI` a missing library fails the test.
pub fn bot_or_skip(lib: Lib) -> Option<Command> {
    match bot_command(lib) {
        Ok(c) => Some(c),
        Err(why) if in_ci() => panic!("{lib:?} bot cannot run under CI: {why}"),
        Err(why) => {
            eprintln!("skipping this {lib:?} test: {why}");
            None
        }
    }
}

/// Where a bot connects and as whom.
#[derive(Clone, Debug)]
pub struct Target {
    /// REST base, `http://…/api/v10`.
    pub api_base: String,
    /// Gateway URL (discord.py only; discord.js asks `/gateway/bot`).
    pub gateway: String,
    pub token: String,
    pub shard_count: u32,
}

/// A running library bot: its stdout events and its stdin.
pub struct Bot {
    pub lib: Lib,
    pub child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Value>,
    pub seen: Vec<Value>,
    stderr: Option<tokio::task::JoinHandle<String>>,
}

impl Bot {
    pub fn spawn(
        mut cmd: Command,
        lib: Lib,
        target: &Target,
        shards: &[u32],
        env: &[(&str, &str)],
    ) -> Bot {
        let ids: Vec<String> = shards.iter().map(u32::to_string).collect();
        cmd.env("SW_API_BASE", &target.api_base)
            .env("SW_GATEWAY", &target.gateway)
            .env("SW_TOKEN", &target.token)
            .env("SW_SHARDS", ids.join(","))
            .env("SW_SHARD_COUNT", target.shard_count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn the bot");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"event": "stdout", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        Bot {
            lib,
            stdin: child.stdin.take(),
            child,
            events,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    pub fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.start_kill();
        let seen: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        panic!(
            "{:?}: {what}\nevents so far:\n{}",
            self.lib,
            seen.join("\n")
        );
    }

    async fn stderr_text(&mut self) -> String {
        match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        }
    }

    /// The next event matching `pred` (events before it are kept in `seen`). An `error`
    /// event fails the test.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    let status = self.child.wait().await;
                    let stderr = self.stderr_text().await;
                    self.fail(&format!(
                        "bot exited ({status:?}) while waiting for {what}; stderr:\n{stderr}"
                    ));
                }
                Err(_) => self.fail(&format!("timed out waiting for {what}")),
            };
            self.seen.push(ev.clone());
            if ev["event"] == "error" {
                self.fail(&format!("error event while waiting for {what}: {ev}"));
            }
            if pred(&ev) {
                return ev;
            }
        }
    }

    /// Every event until the bot exits by itself (error events included), and its exit
    /// status.
    pub async fn until_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) => break,
                Err(_) => self.fail("timed out waiting for the bot to exit"),
            }
        }
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => self.fail("stdout closed but the bot does not exit"),
        }
    }

    pub async fn command(&mut self, cmd: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        let line = format!("{cmd}\n");
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            self.fail(&format!("could not write {cmd} to the bot"));
        }
    }

    /// Asks the bot to exit; it must say so and end with status 0.
    pub async fn exit(mut self) {
        self.command(json!({"op": "exit"})).await;
        self.wait_for("exit", STEP_TIMEOUT, |e| e["event"] == "exit")
            .await;
        let status = tokio::time::timeout(STEP_TIMEOUT, self.child.wait())
            .await
            .expect("the bot exits")
            .expect("wait");
        assert!(status.success(), "{:?}: exit status {status}", self.lib);
    }

    /// How many `message_create` events with this id were seen.
    pub fn message_count(&self, id: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| e["event"] == "message_create" && e["id"] == id)
            .count()
    }

    /// The ids of the `message_create` events seen, in order.
    pub fn message_ids(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e["event"] == "message_create")
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect()
    }
}

/// Checks a `ready` event: exactly `expected` guilds in the library's cache, each with the
/// channels, roles, emojis, stickers and members the simulator's world gives it (members
/// as Discord sends them without GUILD_PRESENCES: the bot and the member in voice), on the
/// shard Discord's formula puts it on; the bot's own user and application.
pub fn assert_full_cache(
    lib: Lib,
    ready: &Value,
    expected: &std::collections::BTreeSet<u64>,
    shard_count: u32,
) {
    use shardwarden::simulator::world;
    let guilds = ready["guilds"].as_array().cloned().unwrap_or_default();
    let got: std::collections::BTreeSet<u64> = guilds
        .iter()
        .filter_map(|g| g["id"].as_str()?.parse().ok())
        .collect();
    assert_eq!(&got, expected, "{lib:?}: guilds in the cache: {ready}");
    for g in &guilds {
        let id: u64 = g["id"].as_str().unwrap().parse().unwrap();
        let gc = world::guild_create(id, 0);
        let count = |k: &str| gc[k].as_array().map_or(0, Vec::len);
        assert_eq!(
            g["shard"],
            (id >> 22) % u64::from(shard_count),
            "{lib:?}: shard of {g}"
        );
        assert_eq!(g["name"], gc["name"], "{lib:?}: {g}");
        assert_eq!(g["channels"], count("channels"), "{lib:?}: channels of {g}");
        assert_eq!(g["text_channels"], 3, "{lib:?}: {g}");
        assert_eq!(g["voice_channels"], 1, "{lib:?}: {g}");
        assert_eq!(g["categories"], 2, "{lib:?}: {g}");
        assert_eq!(g["threads"], count("threads"), "{lib:?}: threads of {g}");
        assert_eq!(g["roles"], count("roles"), "{lib:?}: roles of {g}");
        assert_eq!(g["emojis"], count("emojis"), "{lib:?}: emojis of {g}");
        assert_eq!(g["stickers"], count("stickers"), "{lib:?}: stickers of {g}");
        assert_eq!(g["member_count"], gc["member_count"], "{lib:?}: {g}");
        assert_eq!(g["members"], count("members"), "{lib:?}: members of {g}");
        assert_eq!(g["me"], true, "{lib:?}: the bot's own member of {g}");
    }
    assert_eq!(ready["user_id"], shardwarden::simulator::BOT_USER_ID);
    assert_eq!(ready["application_id"], shardwarden::simulator::BOT_USER_ID);
}
