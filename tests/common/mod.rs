//! Shared harness: one shard actor (or a whole daemon) against the embedded
//! simulator over real loopback sockets.
#![allow(dead_code)]

pub mod bots;
pub mod daemon;
pub mod servers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shardwarden::compression::Compression;
use shardwarden::config::Token;
use shardwarden::event_log::EventLog;
use shardwarden::hub::{Hub, IdentifyBudget, OutboundCommand, SessionReport};
use shardwarden::identify_queue::IdentifyQueue;
use shardwarden::shard::{ResumeState, Shard, ShardConfig, ShardExit};
use shardwarden::simulator::{ClientFrame, SimConfig, Simulator};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "sim-token-0000";
pub const WAIT: Duration = Duration::from_secs(10);

/// GUILDS | GUILD_MESSAGES | MESSAGE_CONTENT
pub const INTENTS: u64 = 1 | (1 << 9) | (1 << 15);

pub fn sim_config() -> SimConfig {
    SimConfig {
        token: TOKEN.to_string(),
        heartbeat_interval_ms: 400,
        guilds_per_shard: 2,
        ..SimConfig::default()
    }
}

pub fn hub(
    shards: &[u32],
    total: u32,
    events: &[&str],
) -> (Arc<Hub>, HashMap<u32, mpsc::Receiver<OutboundCommand>>) {
    let mut commands = HashMap::new();
    let mut receivers = HashMap::new();
    for &s in shards {
        let (tx, rx) = mpsc::channel(64);
        commands.insert(s, tx);
        receivers.insert(s, rx);
    }
    let hub = Arc::new(Hub::new(
        EventLog::new(1, 64 << 20),
        shards,
        total,
        events.iter().map(|e| e.to_string()).collect(),
        commands,
        IdentifyBudget {
            remaining: 1000,
            total: 1000,
            resets_at_ms: shardwarden::clock::unix_millis() + 86_400_000,
            max_concurrency: 1,
        },
    ));
    (hub, receivers)
}

pub struct ShardHarness {
    pub sim: Simulator,
    pub hub: Arc<Hub>,
    pub shutdown: watch::Sender<bool>,
    pub reports: mpsc::UnboundedReceiver<SessionReport>,
    pub task: JoinHandle<ShardExit>,
    pub commands: mpsc::Sender<OutboundCommand>,
}

pub async fn start_shard(
    sim_cfg: SimConfig,
    compression: Compression,
    intents: u64,
    resume: Option<ResumeState>,
) -> ShardHarness {
    let sim = Simulator::start(sim_cfg).await.expect("simulator starts");
    start_shard_on(sim, compression, intents, resume).await
}

pub async fn start_shard_on(
    sim: Simulator,
    compression: Compression,
    intents: u64,
    resume: Option<ResumeState>,
) -> ShardHarness {
    start_shard_with(sim, compression, intents, resume, |_| {}).await
}

pub async fn start_shard_with(
    sim: Simulator,
    compression: Compression,
    intents: u64,
    resume: Option<ResumeState>,
    tweak: impl FnOnce(&mut ShardConfig),
) -> ShardHarness {
    let (hub, mut receivers) = hub(
        &[0],
        1,
        &["READY", "RESUMED", "GUILD_CREATE", "MESSAGE_CREATE"],
    );
    let queue = Arc::new(IdentifyQueue::new(1, 0, hub.clone()));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (report_tx, reports) = mpsc::unbounded_channel();
    let mut config = ShardConfig::new(0, 1, Token::new(TOKEN), intents, sim.gateway_url());
    config.compression = compression;
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    tweak(&mut config);
    let stats = hub.shards[0].clone();
    let commands = hub.commands[&0].clone();
    let mut shard = Shard::new(
        config,
        hub.clone(),
        stats,
        queue,
        receivers.remove(&0).expect("receiver"),
        shutdown_rx,
        report_tx,
        resume,
    );
    let task = tokio::spawn(async move { shard.run().await });
    ShardHarness {
        sim,
        hub,
        shutdown,
        reports,
        task,
        commands,
    }
}

impl ShardHarness {
    pub fn frames(&self, op: u8) -> Vec<ClientFrame> {
        self.sim
            .frames()
            .into_iter()
            .filter(|f| f.op == op)
            .collect()
    }

    pub async fn wait(&self, what: &str, f: impl Fn(&Simulator) -> bool) {
        assert!(
            self.sim.wait_until(f, WAIT).await,
            "timed out waiting for {what}; frames: {:?}",
            self.sim
                .frames()
                .iter()
                .map(|f| (f.conn, f.op))
                .collect::<Vec<_>>()
        );
    }

    pub async fn wait_report(&mut self, event: &str) -> SessionReport {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) if r.event == event => return r,
                Ok(Some(other)) => eprintln!(
                    "report: {} {:?} {:?}",
                    other.event, other.class, other.detail
                ),
                Ok(None) => panic!("shard ended before reporting {event}"),
                Err(_) => panic!("timed out waiting for session event {event}"),
            }
        }
    }

    pub async fn ready(&mut self) -> SessionReport {
        self.wait_report("ready").await
    }

    pub async fn stop(self) -> ShardExit {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("shard stops")
            .expect("no panic")
    }
}

pub fn count_ops(frames: &[ClientFrame], op: u8) -> usize {
    frames.iter().filter(|f| f.op == op).count()
}
