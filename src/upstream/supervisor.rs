//! The supervisor: plans the shards, starts them through the identify queue,
//! restarts crashed actors, notices Discord-side incidents, logs session
//! health, and on SIGTERM persists every session so the next start resumes.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::bot_server::{BotServer, BotServerConfig};
use crate::cluster::ownership::LeaseEvent;
use crate::config::{Config, ShardTotal, Token};
use crate::event_log::EventLog;
use crate::hub::{Hub, IdentifyBudget, SessionReport, ShardState};
use crate::identify_queue::IdentifyQueue;
use crate::persist::{Persister, Restored};
use crate::rest::{self, RestErrorKind};
use crate::shard::{ResumeState, Shard, ShardConfig, ShardExit, gateway_url_ok};
use crate::state::StateStore;
use crate::upstream::rest_limiter::Limiter;

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
    /// How often the front door's cache is saved while it changes
    /// (default `frontdoor::snapshot::SAVE_EVERY`; tests shorten it).
    pub snapshot_every: Option<Duration>,
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
    // One HTTP client (one connection pool) for every REST call: the
    // /gateway/bot reads here and the front door's forward.
    let api = crate::upstream::http::ApiClient::new(&api_base)
        .map_err(|e| DaemonError::config(format!("[discord] api_base = {api_base:?}: {e}")))?;

    // Off the runtime's threads and with a timeout: a state file that
    // blocks (a FIFO, a hung mount) must not hang start-up or signals.
    let store = StateStore::new(&config.state.dir);
    let loaded = tokio::select! {
        loaded = store.load_async(crate::state::IO_TIMEOUT) => loaded,
        _ = recv_signal(&mut sigterm) => return stopped_before_start("SIGTERM"),
        _ = recv_signal(&mut sigint) => return stopped_before_start("SIGINT"),
        _ = wait_true(&mut external) => return stopped_before_start("shutdown requested"),
    };
    let mut state_lost = false;
    let saved = match loaded {
        Ok((saved, warning)) => {
            if let Some(warning) = warning {
                tracing::warn!(event = %"state_ignored", "{warning}");
                state_lost = true;
            }
            saved
        }
        Err(message) => {
            return Err(DaemonError::config(format!(
                "{message}. Refusing to start: without the state file cursors could be handed out twice and sessions would identify again. Fix or remove {} ([state] dir); after removing it, bots should reconnect with resume_from null",
                store.path().display()
            )));
        }
    };

    tracing::info!(token = %token.fingerprint(), api_base = %api_base, "fetching /gateway/bot");
    // With the front door on, one limiter paces every REST call of the
    // token, the daemon's own included (they count toward the global limit).
    let limiter = config
        .proxy
        .as_ref()
        .map(|p| Arc::new(Limiter::from_config(p)));
    let fetch = rest::get_gateway_bot_with_retry(
        &api,
        &token,
        limiter.as_deref(),
        Duration::from_secs(300),
    );
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
    if !owned.contains(&0) {
        for warning in crate::intents::shard_zero_warnings(&plan) {
            tracing::warn!(event = %"config_warning", "{warning}");
        }
    }
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

    // With [proxy] on, the front door's cache as last saved (every few
    // seconds while it changes, and at a clean stop).
    let snapshot_file = crate::frontdoor::snapshot::path(&config.state.dir);
    let snapshot =
        crate::frontdoor::snapshot::load_at_start(config.proxy.is_some(), &snapshot_file).await;
    // Persisted sessions: fresh ones are resumed, stale ones dropped.
    let no_cache = std::collections::BTreeMap::new();
    let restored = Restored::from_saved(
        saved,
        total,
        &owned,
        config.state.resume_window,
        config
            .proxy
            .as_ref()
            .map(|_| snapshot.as_ref().map_or(&no_cache, |s| &s.sessions)),
    );
    let mut restored = restored;
    if state_lost {
        // The lease in the lost file is unknown: continue from a floor no
        // earlier life can have reached (microseconds since the epoch), so
        // no cursor a bot holds is handed out again. What came before is
        // unknown, not "missed".
        let floor = crate::clock::unix_millis().saturating_mul(1000);
        restored.first_cursor = restored.first_cursor.max(floor);
        crate::state::add_range(&mut restored.not_missed, 1, restored.first_cursor - 1);
    }
    let first_cursor = restored.first_cursor;
    // With [cluster] the sessions to resume come from Redis, with the lease
    // of each shard (whoever ran it last may have been another daemon).
    let mut resumes = if config.cluster.is_some() {
        HashMap::new()
    } else {
        restored.resumes.clone()
    };
    let redis = match &config.cluster {
        Some(c) => {
            tracing::info!(
                redis = %crate::cluster::coord::redacted_url(&c.redis),
                name = %c.name,
                lease_ttl_ms = c.lease_ttl.as_millis() as u64,
                range = %config.shards.range,
                "cluster: shards run only while this daemon holds their Redis lease"
            );
            Some(
                crate::cluster::coord::Redis::new(
                    &c.redis,
                    &c.name,
                    (c.lease_ttl / 6).max(Duration::from_millis(200)),
                )
                .map_err(DaemonError::config)?,
            )
        }
        None => None,
    };

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

    if config.cluster.is_some() {
        // Owned only once leased (the keeper takes the leases).
        for stats in &hub.shards {
            stats.owned.store(false, Ordering::Relaxed);
        }
    }
    hub.log.set_not_missed(restored.not_missed.clone());
    hub.consumers.set_ttl(config.bot.consumer_ttl);
    if let Some(saved) = &restored.saved {
        hub.consumers.restore(&saved.clients, saved.saved_at_ms);
        // A JetStream sink of a [broker] no longer configured must not hold
        // the resume point back.
        let sink = config
            .broker
            .as_ref()
            .map(|b| crate::cluster::broker::consumer_name(&b.stream));
        hub.consumers
            .forget_where(|name| name.starts_with("jetstream:") && Some(name) != sink.as_deref());
    }
    let queue = Arc::new(IdentifyQueue::new(
        limit.max_concurrency,
        config.shards.identify_reserve,
        hub.clone(),
    ));
    if let Some(saved) = &restored.saved {
        queue.restore(&saved.identify);
    }
    if let Some(redis) = &redis {
        queue.set_cluster(redis.clone());
    }
    // The cursor lease (and the sessions being resumed) must be on disk
    // before any event gets a cursor.
    let mut persister = Persister::new(
        store.clone(),
        hub.clone(),
        queue.clone(),
        total,
        restored.not_missed.clone(),
    )
    .refresh_every(config.state.resume_window / 2);
    if let Err(e) = persister.lease(&restored).await {
        return Err(DaemonError::config(format!(
            "cannot write the state file {} ({e}). Refusing to start: cursors must be leased durably before any is handed out, or a crash could hand one out twice. Make [state] dir = {:?} writable (and not full) by the daemon's user",
            store.path().display(),
            config.state.dir.display()
        )));
    }

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
    let mut snapshot_task = None;
    if let Some(proxy) = &config.proxy {
        if !config.discord.events.iter().any(|e| e == "*") {
            tracing::warn!(event = %"config_warning", "[proxy] is on but [discord] events lists {} event(s): drop-in clients get only those live (READY and GUILD_CREATE are rebuilt regardless); use events = [\"*\"] so libraries see everything their intents cover", plan.events.len());
        }
        let door = crate::frontdoor::FrontDoor::bind(
            proxy,
            api.clone(),
            limiter
                .clone()
                .unwrap_or_else(|| Arc::new(Limiter::from_config(proxy))),
            token.clone(),
            plan.bits,
            hub.clone(),
            shutdown_rx.clone(),
        )
        .await
        .map_err(DaemonError::config)?;
        tokio::spawn(door.run());
        if let Some(snapshot) = &snapshot {
            // After a crash the cache may be a few seconds older than the
            // saved session: resume from the cache's seq so Discord replays
            // what it lacks (bots get those events again: at-least-once).
            for (shard, resume) in resumes.iter_mut() {
                if let Some(seq) = snapshot.seq(*shard)
                    && seq < resume.seq
                {
                    tracing::info!(
                        shard = *shard,
                        saved_seq = resume.seq,
                        cache_seq = seq,
                        "resuming from the front door cache's seq {seq} instead of {}: Discord replays the {} events in between, and bots get them again",
                        resume.seq,
                        resume.seq - seq
                    );
                    resume.seq = seq;
                }
            }
            let resumed: std::collections::HashSet<u32> = resumes.keys().copied().collect();
            let applied = snapshot.restore(&hub, &resumed);
            tracing::info!(
                shards = resumed.len(),
                events = applied,
                "front door cache restored; those shards resume"
            );
        }
        snapshot_task = Some(tokio::spawn(crate::frontdoor::snapshot::save_every(
            hub.clone(),
            snapshot_file.clone(),
            options
                .snapshot_every
                .unwrap_or(crate::frontdoor::snapshot::SAVE_EVERY),
            shutdown_rx.clone(),
        )));
    }
    let mut broker = match config.broker.clone() {
        Some(cfg) => {
            tracing::info!(nats = %cfg.nats, stream = %cfg.stream, "JetStream sink on");
            crate::cluster::broker::start(cfg, hub.clone(), shutdown_rx.clone())
                .await
                .map_err(DaemonError::config)?
        }
        None => JoinSet::new(),
    };

    // Discord's figures, not a local count: re-read now and then, and
    // before identifying on old ones (facts §1.1).
    queue.set_source(
        Arc::new(RestGatewayBot {
            api: api.clone(),
            limiter: limiter.clone(),
            hub: hub.clone(),
            token: token.clone(),
        }),
        &gateway,
    );
    tokio::spawn(
        queue
            .clone()
            .refresh_loop(crate::identify_queue::REFRESH_EVERY, shutdown_rx.clone()),
    );
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<SessionReport>();
    let shard_factory = ShardFactory {
        total,
        token: token.clone(),
        intents: plan.bits,
        gateway_url: gateway.url.clone(),
        compression: config.discord.compression,
        large_threshold: config.discord.large_threshold,
        backoff_min: options.backoff_min,
        hub: hub.clone(),
        queue: queue.clone(),
        report_tx,
    };
    let mut shards: JoinSet<ShardDone> = JoinSet::new();
    // With [cluster]: each running shard's own stop signal (a lost lease
    // stops one shard), and claims waiting for an old actor to finish.
    let mut stops: HashMap<u32, watch::Sender<bool>> = HashMap::new();
    let mut pending: HashMap<u32, Option<ResumeState>> = HashMap::new();
    let (lease_tx, mut lease_rx) = mpsc::unbounded_channel();
    let keeper = match (&redis, &config.cluster) {
        (Some(redis), Some(c)) => {
            let max = match (config.shards.range, c.max_shards) {
                (crate::config::ShardRange::Auto, Some(m)) => m as usize,
                _ => owned.len(),
            };
            let keeper = crate::cluster::ownership::Keeper::new(
                redis.clone(),
                hub.clone(),
                c.lease_ttl,
                owned.clone(),
                max,
                config.state.resume_window,
                lease_tx,
            );
            Some(tokio::spawn(keeper.run(shutdown_rx.clone())))
        }
        _ => {
            drop(lease_tx);
            for &id in &owned {
                let rx = receivers.remove(&id).expect("receiver per shard");
                let shard = shard_factory.build(id, rx, shutdown_rx.clone(), resumes.remove(&id));
                shards.spawn(supervise_returning(shard, id));
            }
            None
        }
    };
    let cluster = keeper.is_some();

    // Persist whatever a restart needs as it changes, so even a crash (no
    // clean shutdown) resumes and never reuses a cursor.
    let persister = tokio::spawn(persister.run(shutdown_rx.clone()));

    let mut summary = tokio::time::interval(config.health.log_interval);
    summary.tick().await;
    let mut notifier = crate::systemd::Notifier::new();
    notifier.update(&hub);
    let mut watchdog = notifier.watchdog_every.map(tokio::time::interval);
    let mut config = config;
    let reload_log_level = options.reload_log_level;
    let config_path = options.config_path;
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
                if let Some(incident) = hub.detector.gateway(&report, &hub) {
                    hub.report_incident(&incident);
                }
                if !notifier.is_ready() {
                    notifier.update(&hub);
                }
            }
            // Raised or cleared here, by the front door's REST calls or by
            // a /gateway/bot re-read: a Discord-side incident slows
            // re-identifies.
            _ = hub.incident_changed.notified() => {
                queue.set_stretch(if hub.incident().is_some() { 300 } else { 100 });
            }
            _ = summary.tick() => {
                if let Some(incident) = hub.detector.tick(&hub) {
                    hub.report_incident(&incident);
                }
                log_summary(&hub);
                notifier.update(&hub);
            }
            Some(event) = lease_rx.recv() => match event {
                LeaseEvent::Claimed { shard, resume, .. } => match receivers.remove(&shard) {
                    Some(rx) => {
                        let (stop_tx, stop_rx) = watch::channel(false);
                        stops.insert(shard, stop_tx);
                        let actor = shard_factory.build(shard, rx, stop_rx, resume);
                        shards.spawn(supervise_returning(actor, shard));
                    }
                    // The previous actor of this shard is still stopping.
                    None => {
                        pending.insert(shard, resume);
                    }
                },
                LeaseEvent::Lost { shard } => {
                    pending.remove(&shard);
                    if let Some(stop) = stops.remove(&shard) {
                        let _ = stop.send(true);
                    }
                }
            },
            Some(joined) = shards.join_next() => {
                if let Ok((id, exit, mut rx)) = joined {
                    if cluster {
                        stops.remove(&id);
                        // Commands queued for the stopped actor are answered
                        // now, not sent by whichever actor runs it next.
                        while let Ok(command) = rx.try_recv() {
                            let _ = command.reply.send(Err(crate::hub::SendRefusal {
                                code: crate::protocol::code::SHARD_NOT_OWNED,
                                message: format!("shard {id} stopped before the command was sent: this daemon no longer holds its lease"),
                            }));
                        }
                        receivers.insert(id, rx);
                        if let Some(resume) = pending.remove(&id)
                            && hub.shard(id).is_some()
                        {
                            let (stop_tx, stop_rx) = watch::channel(false);
                            stops.insert(id, stop_tx);
                            let rx = receivers.remove(&id).expect("just returned");
                            let actor = shard_factory.build(id, rx, stop_rx, resume);
                            shards.spawn(supervise_returning(actor, id));
                        }
                        // A lease lost: the shard stopped resumably and is
                        // someone else's now; nothing to keep.
                        if matches!(exit, ShardExit::Fatal { .. }) {
                            exits.push((id, exit));
                        }
                    } else {
                        exits.push((id, exit));
                    }
                }
                let fatal = exits.iter().filter(|(_, e)| matches!(e, ShardExit::Fatal { .. })).count();
                // With [cluster]: every shard whose lease this daemon holds
                // closed fatally and none runs (shards stopped for a lost
                // lease are not held, so a Redis outage never ends here).
                let all_fatal = if cluster {
                    shards.is_empty()
                        && hub.owned().count() > 0
                        && hub.owned().all(|s| {
                            exits.iter().any(|(id, e)| *id == s.shard && matches!(e, ShardExit::Fatal { .. }))
                        })
                } else {
                    fatal == owned.len()
                };
                if all_fatal {
                    hub.set_closing(
                        crate::protocol::closing::SHUTDOWN,
                        "every shard this daemon owns closed fatally; the daemon exits (see its log for what to fix)".to_string(),
                    );
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
    hub.set_closing(
        crate::protocol::closing::SHUTDOWN,
        format!(
            "{reason}: the daemon is stopping and saving its sessions; reconnect and resume_from your last cursor"
        ),
    );
    let _ = shutdown_tx.send(true);
    for stop in stops.values() {
        let _ = stop.send(true);
    }
    while let Some(joined) = shards.join_next().await {
        if let Ok((id, exit, _)) = joined {
            exits.push((id, exit));
        }
    }
    // The persister stops on the shutdown signal; wait so its last write
    // cannot land after (and over) the final one.
    let persister = match persister.await {
        Ok(persister) => persister,
        Err(e) => {
            return Err(DaemonError {
                exit_code: EXIT_FAILURE,
                message: format!("the state writer failed ({e}); sessions were not saved"),
            });
        }
    };
    let _ = server_task.await;
    // The sink's last acknowledged position goes into the final save.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while broker.join_next().await.is_some() {}
    })
    .await;
    let sessions: Vec<(u32, ResumeState)> = exits
        .into_iter()
        .filter_map(|(id, exit)| match exit {
            ShardExit::Shutdown(Some(resume)) => Some((id, resume)),
            _ => None,
        })
        .collect();
    if let Some(keeper) = keeper
        && let Ok(keeper) = keeper.await
    {
        keeper.finish(&sessions).await;
    }
    if let Some(task) = snapshot_task {
        // Its last periodic write must not land after the final one.
        let _ = task.await;
        crate::frontdoor::snapshot::save_at_shutdown(&hub, &sessions, &snapshot_file).await;
    }
    save_state_at_shutdown(persister, sessions, &store, config.state.resume_window).await
}

/// The final state write: the sessions the next start resumes. A failure
/// exits 1 and says which earlier state the next start will use.
async fn save_state_at_shutdown(
    mut persister: Persister,
    sessions: Vec<(u32, ResumeState)>,
    store: &StateStore,
    resume_window: Duration,
) -> Result<(), DaemonError> {
    match persister.finish(sessions).await {
        Ok(state) => {
            tracing::info!(
                sessions = state.sessions.len(),
                next_cursor = state.next_cursor,
                clients = state.clients.len(),
                path = %store.path().display(),
                "state saved; the next start within [state] resume_window resumes these sessions"
            );
            Ok(())
        }
        Err(e) => {
            let fallback = match persister.last_written() {
                Some(last) => format!(
                    "the next start uses the state written at {} ({} sessions, resumed if still within [state] resume_window = {} s; Discord then replays what came after it)",
                    crate::clock::rfc3339_millis(last.saved_at_ms),
                    last.sessions.len(),
                    resume_window.as_secs()
                ),
                None => "no state was written in this run".to_string(),
            };
            Err(DaemonError {
                exit_code: EXIT_FAILURE,
                message: format!(
                    "cannot save state to {} at shutdown ({e}); {fallback}. Fix [state] dir (permissions, free space)",
                    store.path().display()
                ),
            })
        }
    }
}

/// `GET /gateway/bot` for the identify queue's re-reads.
struct RestGatewayBot {
    api: Arc<crate::upstream::http::ApiClient>,
    /// Paces the call with the front door's REST traffic, when it runs.
    limiter: Option<Arc<Limiter>>,
    /// Told each outcome (incident detection).
    hub: Arc<Hub>,
    token: Token,
}

impl crate::identify_queue::GatewayBotSource for RestGatewayBot {
    fn fetch(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<rest::GatewayBot, String>> + Send + '_>> {
        Box::pin(async move {
            let result =
                rest::get_gateway_bot_paced(&self.api, &self.token, self.limiter.as_deref()).await;
            let failed = result
                .as_ref()
                .err()
                .is_some_and(|e| e.class().is_discord_side());
            self.hub.observe_rest("GET /gateway/bot", failed);
            result.map_err(|e| e.to_string())
        })
    }
}

/// A shard actor's end, with its command receiver back (a shard stopped
/// for a lost lease may be claimed again later).
type ShardDone = (u32, ShardExit, mpsc::Receiver<crate::hub::OutboundCommand>);

/// Builds shard actors, at start-up or (with `[cluster]`) when a lease is
/// taken.
struct ShardFactory {
    total: u32,
    token: Token,
    intents: u64,
    gateway_url: String,
    compression: crate::compression::Compression,
    large_threshold: u32,
    backoff_min: Option<Duration>,
    hub: Arc<Hub>,
    queue: Arc<IdentifyQueue>,
    report_tx: mpsc::UnboundedSender<SessionReport>,
}

impl ShardFactory {
    fn build(
        &self,
        id: u32,
        commands: mpsc::Receiver<crate::hub::OutboundCommand>,
        stop: watch::Receiver<bool>,
        resume: Option<ResumeState>,
    ) -> Shard {
        let mut shard_config = ShardConfig::new(
            id,
            self.total,
            self.token.clone(),
            self.intents,
            self.gateway_url.clone(),
        );
        shard_config.compression = self.compression;
        shard_config.large_threshold = self.large_threshold;
        if let Some(min) = self.backoff_min {
            shard_config.backoff_min = min;
            shard_config.backoff_max = min * 20;
        }
        let stats = self
            .hub
            .shard_stats(id)
            .expect("every shard this daemon may run has stats")
            .clone();
        Shard::new(
            shard_config,
            self.hub.clone(),
            stats,
            self.queue.clone(),
            commands,
            stop,
            self.report_tx.clone(),
            resume,
        )
    }
}

/// [`supervise_mut`], giving the shard's command receiver back.
async fn supervise_returning(mut shard: Shard, id: u32) -> ShardDone {
    let exit = supervise_mut(&mut shard, id).await;
    (id, exit, shard.into_commands())
}

fn stopped_before_start(reason: &str) -> Result<(), DaemonError> {
    tracing::info!(reason, "stopped before any shard started; nothing to save");
    Ok(())
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
async fn supervise_mut<A: Actor>(actor: &mut A, id: u32) -> ShardExit {
    let mut restarts = 0u32;
    let mut backoff =
        crate::shard::reconnect_backoff(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        match AssertUnwindSafe(actor.run()).catch_unwind().await {
            Ok(exit) => return exit,
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

/// One summary line for the daemon and one per unhealthy shard.
fn log_summary(hub: &Hub) {
    let active = hub
        .owned()
        .filter(|s| s.state() == ShardState::Active)
        .count();
    let budget = *hub.budget.lock().unwrap_or_else(|p| p.into_inner());
    let (ring_bytes, ring_events, evicted) = hub.log.usage();
    let mut latencies: Vec<u64> = hub.owned().filter_map(|s| s.latency_ms()).collect();
    latencies.sort_unstable();
    let p50 = latencies.get(latencies.len() / 2).copied();
    tracing::info!(
        event = %"summary",
        shards_active = active,
        shards = hub.owned().count(),
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
        hub.owned().count()
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
    // Shards on their way to their first session (queued for their
    // IDENTIFY turn, connecting, identifying) with nothing gone wrong yet
    // are normal at start-up, not a warning.
    let mut starting = Vec::new();
    for s in hub.owned().filter(|s| s.state() != ShardState::Active) {
        let first_start = matches!(
            s.state(),
            ShardState::Idle
                | ShardState::Queued
                | ShardState::Connecting
                | ShardState::AwaitingHello
                | ShardState::Identifying
                | ShardState::Resuming
        ) && s.setbacks.load(Ordering::Relaxed) == 0
            && s.heartbeat_misses.load(Ordering::Relaxed) == 0;
        if first_start {
            starting.push(s.shard);
            continue;
        }
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
            last_close = %s
                .last_close()
                .map_or(crate::status::NONE.to_string(), |c| c.to_string()),
            "shard {} is {}",
            s.shard,
            s.state().as_str()
        );
    }
    if !starting.is_empty() {
        tracing::info!(
            event = %"shards_starting",
            count = starting.len(),
            shards = ?starting,
            "{} shards still starting (waiting for their IDENTIFY turn, connecting or identifying; nothing has failed)",
            starting.len()
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
    if new.bot.consumer_ttl != current.bot.consumer_ttl {
        hub.consumers.set_ttl(new.bot.consumer_ttl);
        applied.push("[bot] consumer_ttl");
        running.bot.consumer_ttl = new.bot.consumer_ttl;
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
        (n.broker != c.broker, "[broker]"),
        (n.cluster != c.cluster, "[cluster]"),
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
        let mut actor = actor;
        let exit = supervise_mut(&mut actor, 7).await;
        assert!(matches!(exit, ShardExit::Shutdown(None)));
        // Three restarts: at least 0.5 + 1 + 2 s of backoff, not a spin.
        assert!(
            start.elapsed() >= Duration::from_millis(3500),
            "{:?}",
            start.elapsed()
        );
    }
}
