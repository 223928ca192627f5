//! The supervisor: plans the shards, starts them through the identify queue,
//! restarts crashed actors, notices Discord-side incidents, logs session
//! health, and on SIGTERM persists every session so the next start resumes.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bot_server::{BotServer, BotServerConfig};
use crate::config::{Config, ShardTotal, Token};
use crate::event_log::EventLog;
use crate::hub::{Hub, IdentifyBudget, SessionReport, ShardState};
use crate::identify_queue::IdentifyQueue;
use crate::rest::{self, RestErrorKind};
use crate::shard::{ResumeState, Shard, ShardConfig, ShardExit, gateway_url_ok};
use crate::state::{SavedSession, SavedState, StateStore};

/// `EX_CONFIG`: a configuration or permission fault; systemd is told not to
/// restart into it (`RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: i32 = 78;
/// Could not go on for another reason.
pub const EXIT_FAILURE: i32 = 1;

/// Why `run` stopped with an error.
#[derive(Debug)]
pub struct DaemonError {
    /// Process exit code.
    pub exit_code: i32,
    /// What went wrong and what to fix.
    pub message: String,
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl DaemonError {
    fn config(message: impl Into<String>) -> Self {
        DaemonError {
            exit_code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

/// Changes the running log filter (`[health] log_level` on SIGHUP).
pub type SetLogLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Ways to run the daemon other than from a config file alone (demo, tests).
#[derive(Default)]
pub struct DaemonOptions {
    /// Use this token instead of the configured source.
    pub token: Option<Token>,
    /// Use this REST base instead of `[discord] api_base`.
    pub api_base: Option<String>,
    /// Stop when this turns true (in addition to SIGTERM/SIGINT).
    pub shutdown: Option<watch::Receiver<bool>>,
    /// Shorter reconnect backoff (tests, demo).
    pub backoff_min: Option<Duration>,
    /// The config file, re-read on SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
    /// Applies a new log level (from the logging set-up in `main`).
    pub reload_log_level: Option<Box<SetLogLevel>>,
}

/// Run the daemon until shutdown. `Ok` after a clean shutdown.
pub async fn run(config: Config, options: DaemonOptions) -> Result<(), DaemonError> {
    // Take the signals first: a SIGTERM or SIGHUP while still starting must
    // not kill the process with the default action.
    let mut external = options.shutdown;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate());
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt());
    let mut sighup = signal(tokio::signal::unix::SignalKind::hangup());
    let plan = crate::intents::plan(&config.discord.intents, &config.discord.events).map_err(
        |errors| {
            DaemonError::config(
                errors
                    .iter()
                    .map(|e| format!("error: {e}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        },
    )?;
    for warning in &plan.warnings {
        tracing::warn!(event = %"config_warning", "{warning}");
    }
    let token = match options.token {
        Some(token) => token,
        None => config
            .discord
            .token_source
            .load()
            .map_err(DaemonError::config)?,
    };
    let api_base = options
        .api_base
        .unwrap_or_else(|| config.discord.api_base.clone());
    crate::config::check_url(&api_base, &["https", "http"])
        .map_err(|e| DaemonError::config(format!("[discord] api_base = {api_base:?}: {e}")))?;

    let store = StateStore::new(&config.state.dir);
    let saved = match store.load() {
        Ok(saved) => saved,
        Err(message) => {
            tracing::warn!(event = %"state_ignored", "{message}");
            None
        }
    };

    if let Err(e) = check_writable(&config.state.dir) {
        tracing::warn!(event = %"state_unwritable", dir = %config.state.dir.display(), "cannot write the state directory ({e}): sessions will not survive a restart and every restart will spend identifies; fix [state] dir or its permissions");
    }

    tracing::info!(token = %token.fingerprint(), api_base = %api_base, "fetching /gateway/bot");
    let fetch = rest::get_gateway_bot_with_retry(&api_base, &token, Duration::from_secs(300));
    let fetched = tokio::select! {
        result = fetch => result,
        _ = recv_signal(&mut sigterm) => return stopped_before_start("SIGTERM"),
        _ = recv_signal(&mut sigint) => return stopped_before_start("SIGINT"),
        _ = wait_true(&mut external) => return stopped_before_start("shutdown requested"),
    };
    let gateway = fetched.map_err(|e| match e.kind {
        RestErrorKind::Unauthorized | RestErrorKind::Forbidden => {
            DaemonError::config(e.to_string())
        }
        _ => DaemonError {
            exit_code: EXIT_FAILURE,
            message: format!("cannot reach Discord: {e}"),
        },
    })?;
    if !gateway_url_ok(&gateway.url) {
        return Err(DaemonError {
            exit_code: EXIT_FAILURE,
            message: format!(
                "/gateway/bot returned gateway url {:?}: only wss:// (or ws:// to loopback) is accepted",
                gateway.url
            ),
        });
    }
    let limit = &gateway.session_start_limit;
    let total = match config.shards.total {
        ShardTotal::Auto => gateway.shards.max(1),
        ShardTotal::Fixed(n) => n,
    };
    let owned = config
        .shards
        .range
        .resolve(total)
        .map_err(DaemonError::config)?;
    tracing::info!(
        shard_total = total,
        owned = owned.len(),
        recommended = gateway.shards,
        remaining = limit.remaining,
        budget_total = limit.total,
        max_concurrency = limit.max_concurrency,
        reset_after_ms = limit.reset_after,
        "gateway plan"
    );

    // Persisted sessions: fresh ones are resumed, stale ones dropped.
    let mut resumes: HashMap<u32, ResumeState> = HashMap::new();
    let mut first_cursor = 1;
    if let Some(saved) = &saved {
        first_cursor = saved.next_cursor.max(1);
        let age =
            Duration::from_millis(crate::clock::unix_millis().saturating_sub(saved.saved_at_ms));
        if saved.shard_total != total {
            tracing::warn!(
                event = %"state_ignored",
                saved_total = saved.shard_total,
                total,
                "persisted sessions were for another shard count; identifying"
            );
        } else if age > config.state.resume_window {
            tracing::warn!(
                event = %"state_ignored",
                age_s = age.as_secs(),
                window_s = config.state.resume_window.as_secs(),
                "persisted sessions are too old to resume; identifying"
            );
        } else {
            for session in &saved.sessions {
                if owned.contains(&session.shard) {
                    resumes.insert(session.shard, session.into());
                }
            }
            tracing::info!(
                sessions = resumes.len(),
                age_s = age.as_secs(),
                next_cursor = first_cursor,
                "resuming persisted sessions"
            );
        }
    }

    // The front door rebuilds READY and GUILD_CREATE from what the shards
    // receive after READY; a resumed session replays neither, so with
    // [proxy] on the shards identify once at start-up to fill the cache.
    if config.proxy.is_some() && !resumes.is_empty() {
        tracing::warn!(
            event = %"state_ignored",
            sessions = resumes.len(),
            "[proxy] is on: identifying instead of resuming the saved sessions, because the drop-in state cache is filled only by READY and GUILD_CREATE (one identify per shard per daemon start)"
        );
        resumes.clear();
    }
    let mut commands = HashMap::new();
    let mut receivers = HashMap::new();
    for &shard in &owned {
        let (tx, rx) = mpsc::channel(64);
        commands.insert(shard, tx);
        receivers.insert(shard, rx);
    }
    let hub = Arc::new(Hub::new(
        EventLog::new(first_cursor, config.bot.replay_buffer),
        &owned,
        total,
        plan.events.clone(),
        commands,
        IdentifyBudget {
            remaining: limit.remaining,
            total: limit.total,
            resets_at_ms: crate::clock::unix_millis() + limit.reset_after,
            max_concurrency: limit.max_concurrency,
        },
    ));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(listen) = &config.health.metrics_listen {
        let addr = listen.parse().map_err(|e| {
            DaemonError::config(format!("[health] metrics_listen = {listen:?}: {e}"))
        })?;
        crate::telemetry::install(addr).map_err(DaemonError::config)?;
        tokio::spawn(crate::telemetry::export_loop(
            hub.clone(),
            Duration::from_secs(1),
            shutdown_rx.clone(),
        ));
        tracing::info!(listen = %addr, "Prometheus metrics on /metrics");
    }
    let server = BotServer::bind(
        BotServerConfig {
            socket: config.bot.socket.clone(),
            socket_mode: config.bot.socket_mode,
            health_interval: config.health.log_interval,
            version: env!("CARGO_PKG_VERSION"),
        },
        hub.clone(),
    )
    .await
    .map_err(|e| {
        DaemonError::config(format!(
            "[bot] socket = {:?}: {e}",
            config.bot.socket.display()
        ))
    })?;
    let server_task = tokio::spawn(server.run(shutdown_rx.clone()));
    // The drop-in front door (DESIGN.md §5) starts before the shards so its
    // state cache sees every READY and GUILD_CREATE.
    if let Some(proxy) = &config.proxy {
        if !config.discord.events.iter().any(|e| e == "*") {
            tracing::warn!(event = %"config_warning", "[proxy] is on but [discord] events lists {} event(s): drop-in clients get only those live (READY and GUILD_CREATE are rebuilt regardless); use events = [\"*\"] so libraries see everything their intents cover", plan.events.len());
        }
        let door = crate::frontdoor::FrontDoor::bind(
            proxy,
            &api_base,
            token.clone(),
            plan.bits,
            hub.clone(),
            shutdown_rx.clone(),
        )
        .await
        .map_err(DaemonError::config)?;
        tokio::spawn(door.run());
    }

    let queue = Arc::new(IdentifyQueue::new(
        limit.max_concurrency,
        config.shards.identify_reserve,
        hub.clone(),
    ));
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<SessionReport>();
    let mut shards = JoinSet::new();
    for &id in &owned {
        let mut shard_config =
            ShardConfig::new(id, total, token.clone(), plan.bits, gateway.url.clone());
        shard_config.compression = config.discord.compression;
        shard_config.large_threshold = config.discord.large_threshold;
        if let Some(min) = options.backoff_min {
            shard_config.backoff_min = min;
            shard_config.backoff_max = min * 20;
        }
        let stats = hub.shard(id).expect("owned shard has stats").clone();
        let shard = Shard::new(
            shard_config,
            hub.clone(),
            stats,
            queue.clone(),
            receivers.remove(&id).expect("receiver per shard"),
            shutdown_rx.clone(),
            report_tx.clone(),
            resumes.remove(&id),
        );
        shards.spawn(supervise(shard, id));
    }
    drop(report_tx);

    // Persist the cursor lease whenever it moves, and sessions periodically,
    // so even a crash (no clean shutdown) never reuses a cursor.
    let persister = tokio::spawn(persist_loop(
        store.clone(),
        hub.clone(),
        total,
        config.health.log_interval,
        shutdown_rx.clone(),
    ));

    let mut summary = tokio::time::interval(config.health.log_interval);
    summary.tick().await;
    let mut notifier = crate::systemd::Notifier::new();
    notifier.update(&hub);
    let mut watchdog = notifier.watchdog_every.map(tokio::time::interval);
    let mut config = config;
    let reload_log_level = options.reload_log_level;
    let config_path = options.config_path;
    let mut incidents = IncidentDetector::new(owned.len());
    let mut exits: Vec<(u32, ShardExit)> = Vec::new();

    let reason = loop {
        tokio::select! {
            _ = recv_signal(&mut sigterm) => break "SIGTERM",
            _ = recv_signal(&mut sigint) => break "SIGINT",
            _ = wait_true(&mut external) => break "shutdown requested",
            _ = recv_signal(&mut sighup) => {
                notifier.reloading();
                if let Some(new) = reload(&config, config_path.as_deref(), &hub, &queue, reload_log_level.as_deref()) {
                    if new.health.log_interval != config.health.log_interval {
                        summary = tokio::time::interval(new.health.log_interval);
                        summary.tick().await;
                        hub.set_health_interval(new.health.log_interval);
                    }
                    config = new;
                }
                notifier.reloaded(&hub);
            }
            _ = tick_opt(&mut watchdog) => notifier.watchdog(),
            Some(report) = report_rx.recv() => {
                if matches!(report.event, "closed" | "fatal")
                    && let Some(class) = report.class
                {
                    crate::telemetry::count_reconnect(class);
                }
                if let Some(line) = incidents.observe(&report, &hub) {
                    queue.set_stretch(if incidents.active { 300 } else { 100 });
                    hub.report(&line);
                }
                if !notifier.is_ready() {
                    notifier.update(&hub);
                }
            }
            _ = summary.tick() => {
                log_summary(&hub);
                notifier.update(&hub);
            }
            Some(joined) = shards.join_next() => {
                if let Ok((id, exit)) = joined {
                    exits.push((id, exit));
                }
                let fatal = exits.iter().filter(|(_, e)| matches!(e, ShardExit::Fatal { .. })).count();
                if fatal == owned.len() {
                    let _ = shutdown_tx.send(true);
                    let _ = server_task.await;
                    persister.abort();
                    let reasons: Vec<String> = exits
                        .iter()
                        .filter_map(|(id, e)| match e {
                            ShardExit::Fatal { reason, .. } => Some(format!("shard {id}: {reason}")),
                            ShardExit::Shutdown(_) => None,
                        })
                        .collect();
                    return Err(DaemonError::config(format!(
                        "every shard closed fatally; nothing left to run:\n  {}",
                        reasons.join("\n  ")
                    )));
                }
            }
        }
    };

    notifier.stopping();
    tracing::info!(
        reason,
        "shutting down: closing gateway connections resumably and saving sessions"
    );
    let _ = shutdown_tx.send(true);
    while let Some(joined) = shards.join_next().await {
        if let Ok((id, exit)) = joined {
            exits.push((id, exit));
        }
    }
    // The persister stops on the shutdown signal; wait so its last write
    // cannot land after (and over) the final one.
    let _ = persister.await;
    let _ = server_task.await;
    let sessions = sessions_to_save(
        &hub,
        exits.into_iter().filter_map(|(id, exit)| match exit {
            ShardExit::Shutdown(Some(resume)) => Some((id, resume)),
            _ => None,
        }),
    );
    let state = SavedState::new(hub.log.next_cursor(), total, sessions);
    match store.save(&state) {
        Ok(()) => tracing::info!(
            sessions = state.sessions.len(),
            next_cursor = state.next_cursor,
            path = %store.path().display(),
            "state saved; the next start resumes these sessions"
        ),
        Err(e) => {
            tracing::error!(path = %store.path().display(), error = %e, "cannot save state: the next start will identify again (check [state] dir permissions)")
        }
    }
    Ok(())
}

fn stopped_before_start(reason: &str) -> Result<(), DaemonError> {
    tracing::info!(reason, "stopped before any shard started; nothing to save");
    Ok(())
}

/// Can the state directory be created and written?
fn check_writable(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Something the supervisor runs and restarts after a panic.
pub trait Actor: Send {
    /// Run until done; may be called again after a panic.
    fn run(&mut self) -> impl std::future::Future<Output = ShardExit> + Send;
}

impl Actor for Shard {
    fn run(&mut self) -> impl std::future::Future<Output = ShardExit> + Send {
        Shard::run(self)
    }
}

/// Run one shard, restarting it after a panic with capped backoff and
/// jitter. The actor value survives the panic, so the session it holds is
/// resumed, not re-identified.
async fn supervise<A: Actor>(mut actor: A, id: u32) -> (u32, ShardExit) {
    let mut restarts = 0u32;
    let mut backoff =
        crate::shard::reconnect_backoff(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        match AssertUnwindSafe(actor.run()).catch_unwind().await {
            Ok(exit) => return (id, exit),
            Err(panic) => {
                restarts += 1;
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                let wait = backoff.next().unwrap_or(Duration::from_secs(60));
                tracing::error!(
                    shard = id,
                    event = %"actor_panic",
                    class = %"internal",
                    restarts,
                    next_retry_ms = wait.as_millis() as u64,
                    "shard actor panicked ({message}); restarting it with its session intact"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sessions to persist: resume from what bots acknowledged where they ack
/// (unacknowledged events are then replayed by Discord), else from the last
/// sequence delivered.
fn sessions_to_save(
    hub: &Hub,
    sessions: impl IntoIterator<Item = (u32, ResumeState)>,
) -> Vec<SavedSession> {
    // Where bots ack, resume from the acknowledged point; else from what was
    // handed to a bot; with no bot at all, from before everything held, so
    // Discord replays what no bot has seen (at-least-once).
    let acked = hub.acked.load(Ordering::Relaxed);
    let point = if acked > 0 {
        acked
    } else {
        hub.delivered.load(Ordering::Relaxed)
    };
    let gens: Vec<(u32, u32)> = hub
        .shards
        .iter()
        .map(|s| (s.shard, s.session_gen.load(Ordering::Relaxed)))
        .collect();
    let unacked = hub.log.lowest_unacked_seq(point, &gens);
    sessions
        .into_iter()
        .map(|(shard, resume)| {
            let seq = unacked
                .iter()
                .find(|&&(s, _)| s == shard)
                .map_or(resume.seq, |&(_, lowest)| {
                    lowest.saturating_sub(1).min(resume.seq)
                });
            SavedSession {
                shard,
                session_id: resume.session_id,
                resume_url: resume.resume_url,
                seq,
            }
        })
        .collect()
}

async fn persist_loop(
    store: StateStore,
    hub: Arc<Hub>,
    total: u32,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut lease = hub.log.subscribe_lease();
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(5)));
    loop {
        tokio::select! {
            _ = lease.changed() => {}
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let next_cursor = *lease.borrow_and_update();
        // The same resume point as a clean shutdown, so a crash also
        // redelivers what bots had not acknowledged.
        let live = hub.shards.iter().filter_map(|s| {
            let info = s.session();
            Some((
                s.shard,
                ResumeState {
                    session_id: info.session_id?,
                    resume_url: info.resume_url?,
                    seq: s.seq.load(Ordering::Relaxed),
                },
            ))
        });
        let sessions = sessions_to_save(&hub, live);
        let store = store.clone();
        let state = SavedState::new(next_cursor, total, sessions);
        let result = tokio::task::spawn_blocking(move || store.save(&state)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "cannot write the state file; a crash now would identify again (check [state] dir)");
        }
    }
}

/// Correlated failure detection: when more than half the shards (and at
/// least two) lose their connections within a short window, Discord is the
/// likelier culprit than this host.
struct IncidentDetector {
    owned: usize,
    window: Duration,
    failures: VecDeque<(Instant, u32)>,
    /// An incident is in progress.
    active: bool,
}

impl IncidentDetector {
    fn new(owned: usize) -> Self {
        IncidentDetector {
            owned,
            window: Duration::from_secs(20),
            failures: VecDeque::new(),
            active: false,
        }
    }

    /// More than half the shards, and at least two.
    fn threshold(&self) -> usize {
        (self.owned / 2 + 1).max(2)
    }

    /// Feed one report; returns a diagnostic to publish when the incident
    /// state changes.
    fn observe(&mut self, report: &SessionReport, hub: &Hub) -> Option<SessionReport> {
        let now = Instant::now();
        if matches!(report.event, "closed" | "zombie") && report.class != Some("fatal") {
            self.failures.push_back((now, report.shard));
        }
        while let Some(&(at, _)) = self.failures.front() {
            if now.duration_since(at) > self.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        let mut shards: Vec<u32> = self.failures.iter().map(|&(_, s)| s).collect();
        shards.sort_unstable();
        shards.dedup();
        if !self.active && self.owned >= 2 && shards.len() >= self.threshold() {
            self.active = true;
            let mut line = SessionReport::new(shards[0], "discord_incident_suspected");
            line.class = Some("transport");
            line.detail = Some(format!(
                "{} of {} shards lost their connections within {} s (shards {:?}): a Discord-side incident is likely; preferring resumes and slowing re-identifies",
                shards.len(),
                self.owned,
                self.window.as_secs(),
                shards
            ));
            tracing::warn!(
                event = %"discord_incident_suspected",
                class = %"incident",
                shards = shards.len(),
                owned = self.owned,
                "{}",
                line.detail.as_deref().unwrap_or("")
            );
            return Some(line);
        }
        if self.active
            && hub
                .shards
                .iter()
                .all(|s| matches!(s.state(), ShardState::Active | ShardState::Fatal))
        {
            self.active = false;
            self.failures.clear();
            let mut line = SessionReport::new(report.shard, "discord_incident_recovered");
            line.detail =
                Some("every shard is active again; normal identify pacing restored".to_string());
            tracing::info!(
                event = %"discord_incident_recovered",
                class = %"incident",
                "{}",
                line.detail.as_deref().unwrap_or("")
            );
            return Some(line);
        }
        None
    }
}

/// One summary line for the daemon and one per unhealthy shard.
fn log_summary(hub: &Hub) {
    let active = hub
        .shards
        .iter()
        .filter(|s| s.state() == ShardState::Active)
        .count();
    let budget = *hub.budget.lock().unwrap_or_else(|p| p.into_inner());
    let (ring_bytes, ring_events, evicted) = hub.log.usage();
    let mut latencies: Vec<u64> = hub.shards.iter().filter_map(|s| s.latency_ms()).collect();
    latencies.sort_unstable();
    let p50 = latencies.get(latencies.len() / 2).copied();
    tracing::info!(
        event = %"summary",
        shards_active = active,
        shards = hub.shards.len(),
        latency_p50_ms = p50,
        head = hub.log.head(),
        ring_bytes,
        ring_events,
        evicted,
        bots = hub.bot_clients.load(Ordering::Relaxed),
        dropin = hub.frontdoor.get().map(|f| f.sessions.counts().0),
        identify_remaining = budget.remaining,
        identify_total = budget.total,
        "{active}/{} shards active",
        hub.shards.len()
    );
    if let Some(front) = hub.frontdoor.get() {
        for row in front.sessions.health() {
            tracing::info!(
                event = %"dropin_session",
                client = %row.client,
                shard = row.shard,
                state = row.state,
                seq = row.seq,
                resumes = row.resumes,
                "drop-in {} on shard {} is {}",
                row.client,
                row.shard,
                row.state
            );
        }
    }
    for s in hub
        .shards
        .iter()
        .filter(|s| s.state() != ShardState::Active)
    {
        let (p50, p99) = s.latency_percentiles().unzip();
        tracing::warn!(
            event = %"shard_unhealthy",
            shard = s.shard,
            state = %s.state().as_str(),
            latency_ms = s.latency_ms(),
            latency_p50_ms = p50,
            latency_p99_ms = p99,
            heartbeat_misses = s.heartbeat_misses.load(Ordering::Relaxed),
            resumes = s.resumes.load(Ordering::Relaxed),
            identifies = s.identifies.load(Ordering::Relaxed),
            last_close = s.last_close.load(Ordering::Relaxed),
            "shard {} is {}",
            s.shard,
            s.state().as_str()
        );
    }
}

/// SIGHUP: re-read the config, apply what can change live, name what needs
/// a restart. Returns the config now running (None: nothing changed).
fn reload(
    current: &Config,
    path: Option<&std::path::Path>,
    hub: &Hub,
    queue: &IdentifyQueue,
    reload_log_level: Option<&SetLogLevel>,
) -> Option<Config> {
    let Some(path) = path else {
        tracing::warn!(
            event = %"reload",
            "SIGHUP: no config file to re-read (embedded config); nothing changed"
        );
        return None;
    };
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(
                event = %"reload",
                class = %"config",
                "SIGHUP: the new config is invalid, keeping the running one:\n{e}"
            );
            return None;
        }
    };
    if let Err(errors) = crate::intents::plan(&new.discord.intents, &new.discord.events) {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        tracing::error!(
            event = %"reload",
            class = %"config",
            "SIGHUP: the new config is invalid, keeping the running one: {}",
            text.join("; ")
        );
        return None;
    }
    let mut applied = Vec::new();
    let mut restart = Vec::new();
    // What the daemon runs with afterwards: the old config with only the
    // keys applied live taken from the new one, so the next SIGHUP still
    // names every key that is waiting for a restart.
    let mut running = current.clone();
    if new.health.log_level != current.health.log_level {
        match reload_log_level.map(|f| f(&new.health.log_level)) {
            Some(Ok(())) => {
                applied.push("[health] log_level");
                running.health.log_level = new.health.log_level.clone();
            }
            Some(Err(e)) => tracing::warn!(event = %"reload", "cannot change the log level: {e}"),
            None => restart.push("[health] log_level"),
        }
    }
    if new.health.log_interval != current.health.log_interval {
        applied.push("[health] log_interval");
        running.health.log_interval = new.health.log_interval;
    }
    if new.bot.socket_mode != current.bot.socket_mode {
        match crate::bot_server::set_socket_mode(&current.bot.socket, new.bot.socket_mode) {
            Ok(()) => {
                applied.push("[bot] socket_mode");
                running.bot.socket_mode = new.bot.socket_mode;
            }
            Err(e) => tracing::warn!(event = %"reload", "cannot change the socket mode: {e}"),
        }
    }
    if new.discord.events != current.discord.events {
        // Events must be deliverable by the intents the sessions run with
        // (changing intents needs a new IDENTIFY, i.e. a restart).
        match crate::intents::plan(&current.discord.intents, &new.discord.events) {
            Ok(plan) => match hub.set_events(&plan.events) {
                Ok(()) => {
                    applied.push("[discord] events");
                    running.discord.events = new.discord.events.clone();
                }
                Err(e) => {
                    tracing::warn!(event = %"reload", "cannot change the events live: {e}");
                    restart.push("[discord] events");
                }
            },
            Err(errors) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                tracing::warn!(event = %"reload", "the new events need intents the running sessions lack: {}", text.join("; "));
                restart.push("[discord] events");
            }
        }
    }
    if new.shards.identify_reserve != current.shards.identify_reserve {
        queue.set_reserve(new.shards.identify_reserve);
        applied.push("[shards] identify_reserve");
        running.shards.identify_reserve = new.shards.identify_reserve;
    }
    let (n, c) = (&new, current);
    for (changed, key) in [
        (
            n.discord.token_source != c.discord.token_source,
            "[discord] token_env/token_file",
        ),
        (
            n.discord.api_base != c.discord.api_base,
            "[discord] api_base",
        ),
        (n.discord.intents != c.discord.intents, "[discord] intents"),
        (
            n.discord.compression != c.discord.compression,
            "[discord] compression",
        ),
        (
            n.discord.large_threshold != c.discord.large_threshold,
            "[discord] large_threshold",
        ),
        (n.shards.total != c.shards.total, "[shards] total"),
        (n.shards.range != c.shards.range, "[shards] range"),
        (n.bot.socket != c.bot.socket, "[bot] socket"),
        (
            n.bot.replay_buffer != c.bot.replay_buffer,
            "[bot] replay_buffer",
        ),
        (
            n.health.metrics_listen != c.health.metrics_listen,
            "[health] metrics_listen",
        ),
        (
            n.health.log_format != c.health.log_format,
            "[health] log_format",
        ),
        (n.state.dir != c.state.dir, "[state] dir"),
        (
            n.state.resume_window != c.state.resume_window,
            "[state] resume_window",
        ),
    ] {
        if changed {
            restart.push(key);
        }
    }
    tracing::info!(
        event = %"reload",
        applied = ?applied,
        needs_restart = ?restart,
        "SIGHUP: config re-read; applied {}; {}",
        if applied.is_empty() { "nothing".to_string() } else { applied.join(", ") },
        if restart.is_empty() {
            "nothing needs a restart".to_string()
        } else {
            format!("restart the service to apply {} (sessions resume across a restart)", restart.join(", "))
        }
    );
    Some(running)
}

async fn tick_opt(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).ok()
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_true(rx: &mut Option<watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flaky {
        panics_left: u32,
        runs: u32,
    }

    impl Actor for Flaky {
        async fn run(&mut self) -> ShardExit {
            self.runs += 1;
            if self.panics_left > 0 {
                self.panics_left -= 1;
                panic!("simulated bug");
            }
            ShardExit::Shutdown(None)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn panicked_actor_is_restarted_with_backoff() {
        let start = tokio::time::Instant::now();
        let actor = Flaky {
            panics_left: 3,
            runs: 0,
        };
        let (id, exit) = supervise(actor, 7).await;
        assert_eq!(id, 7);
        assert!(matches!(exit, ShardExit::Shutdown(None)));
        // Three restarts: at least 0.5 + 1 + 2 s of backoff, not a spin.
        assert!(
            start.elapsed() >= Duration::from_millis(3500),
            "{:?}",
            start.elapsed()
        );
    }
}
