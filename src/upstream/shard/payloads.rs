//! What a shard does with each gateway payload on one connection (HELLO,
//! heartbeats and their ACKs, dispatches into the event log, READY and
//! RESUMED, op 7 and op 9), and how it writes frames: IDENTIFY, RESUME,
//! heartbeats and bot commands through the connection's send limiter.

use super::*;

impl Shard {
    pub(super) async fn send_frame<S>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
        text: String,
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        conn.limiter.record(Instant::now());
        self.write_frame(sink, text).await
    }

    /// Write a frame whose send-limit slot was already taken.
    pub(super) async fn write_frame<S>(&self, sink: &mut S, text: String) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        match timeout(Duration::from_secs(10), sink.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Disconnect::transport(format!(
                "sending to Discord failed: {e}"
            ))),
            Err(_) => Err(Disconnect::transport(
                "sending to Discord blocked for 10 s".to_string(),
            )),
        }
    }

    pub(super) async fn send_heartbeat<S>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        let d = if self.seq == 0 {
            "null".to_string()
        } else {
            self.seq.to_string()
        };
        self.send_frame(sink, conn, format!("{{\"op\":1,\"d\":{d}}}"))
            .await
    }

    /// Write a bot's command now and tell the bot how it went.
    async fn write_command<S>(
        &self,
        sink: &mut S,
        command: OutboundCommand,
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        let result = self.write_frame(sink, command.payload).await;
        let _ = command.reply.send(match &result {
            Ok(()) => Ok(()),
            Err(_) => Err(SendRefusal {
                code: crate::protocol::code::SHARD_UNAVAILABLE,
                message: format!(
                    "shard {}'s connection failed while sending; send it again",
                    self.id()
                ),
            }),
        });
        result
    }

    pub(super) async fn send_command<S>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
        command: OutboundCommand,
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        match conn.limiter.try_acquire_for_bot(Instant::now()) {
            None => self.write_command(sink, command).await,
            Some(at) => {
                conn.pending.push_back((at, command));
                Ok(())
            }
        }
    }

    pub(super) async fn flush_pending<S>(
        &self,
        sink: &mut S,
        conn: &mut Connection,
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        while let Some((_, command)) = conn.pending.pop_front() {
            match conn.limiter.try_acquire_for_bot(Instant::now()) {
                None => self.write_command(sink, command).await?,
                Some(at) => {
                    conn.pending.push_front((at, command));
                    break;
                }
            }
        }
        Ok(())
    }

    pub(super) fn identify_payload(&self) -> String {
        json!({
            "op": op::IDENTIFY,
            "d": {
                "token": self.config.token.expose(),
                "intents": self.config.intents,
                "shard": [self.config.shard, self.config.total],
                "large_threshold": self.config.large_threshold,
                "properties": {"os": std::env::consts::OS, "browser": "shardwarden", "device": "shardwarden"},
            }
        })
        .to_string()
    }

    pub(super) fn resume_payload(&self) -> Option<String> {
        let (session_id, _) = self.session.as_ref()?;
        Some(
            json!({
                "op": op::RESUME,
                "d": {"token": self.config.token.expose(), "session_id": session_id, "seq": self.seq}
            })
            .to_string(),
        )
    }

    /// One complete gateway payload.
    pub(super) async fn handle_payload<S>(
        &mut self,
        sink: &mut S,
        conn: &mut Connection,
        payload: &[u8],
    ) -> Result<(), Disconnect>
    where
        S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        self.stats
            .bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let envelope = match Envelope::parse(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                close(sink, gateway::CLOSE_RESUMABLE, "malformed payload").await;
                return Err(Disconnect::transport(format!(
                    "malformed payload from Discord ({e}, {} bytes); dropping the connection",
                    payload.len()
                )));
            }
        };
        match envelope.op {
            op::DISPATCH => {
                if let Some(s) = envelope.s {
                    self.seq = s;
                }
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                let t = envelope.t.as_deref().unwrap_or("");
                match t {
                    "READY" => {
                        // Kept for the front door, which rebuilds clients'
                        // READY from it; nothing else reads it.
                        if self.hub.frontdoor.get().is_some() {
                            self.stats.set_ready(envelope.raw_d().as_bytes());
                        }
                        self.on_ready(conn, envelope.raw_d());
                    }
                    "RESUMED" => {
                        conn.active = true;
                        self.set_state(ShardState::Active);
                        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
                        self.report(
                            "resumed",
                            None,
                            None,
                            Some("session resumed; missed events replayed".to_string()),
                            None,
                        );
                    }
                    _ => {}
                }
                // The drop-in state cache sees state-changing events before
                // the log does, so a client snapshot taken at head H already
                // holds every event up to H (never one too few).
                if let Some(front) = self.hub.frontdoor.get()
                    && crate::frontdoor::StateCache::tracks(t)
                    && self.stats.cache_takes(self.seq)
                {
                    front.cache.apply(self.id(), t, envelope.raw_d().as_bytes());
                }
                let generation = self.hub.events_generation();
                if generation != self.events.0 {
                    self.events = (generation, self.hub.events());
                }
                match self.events.1.index(t) {
                    Some(index) => {
                        let generation = self.stats.session_gen.load(Ordering::Relaxed);
                        let appended = self.hub.log.append(
                            self.id(),
                            self.seq,
                            generation,
                            index,
                            t,
                            envelope.raw_d().as_bytes(),
                        );
                        if appended.is_some() {
                            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                            self.stats.count_event(index);
                        } else {
                            // No durable cursor for it (the state directory
                            // cannot be written): not forwarded, and a later
                            // resume starts before it so Discord replays it.
                            self.hub.unforwarded.fetch_add(1, Ordering::Relaxed);
                            self.stats
                                .resume_cap
                                .fetch_min(self.seq.saturating_sub(1), Ordering::Relaxed);
                        }
                    }
                    None => {
                        self.stats.unsubscribed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Only now that the event is in the log: a save that reads
                // this seq finds the event in the ring (and resumes before it
                // if it is not acknowledged).
                self.stats.seq.store(self.seq, Ordering::Relaxed);
                Ok(())
            }
            op::HEARTBEAT => {
                // Answer at once, but never past Discord's send limit: a
                // flood of op 1 must not get the connection closed (4008).
                if conn.limiter.in_window(Instant::now()) + 2 >= gateway::SEND_LIMIT as usize {
                    tracing::warn!(
                        shard = self.id(),
                        "Discord requested more heartbeats than the send limit allows; skipping one"
                    );
                    return Ok(());
                }
                self.send_heartbeat(sink, conn).await
            }
            op::HEARTBEAT_ACK => {
                if let Some(hb) = conn.heartbeat.as_mut()
                    && let Some(rtt) = hb.on_ack(Instant::now())
                {
                    self.stats.record_latency(rtt.as_millis() as u64);
                }
                Ok(())
            }
            op::HELLO => {
                if conn.heartbeat.is_some() {
                    return Ok(()); // A repeated HELLO changes nothing.
                }
                let interval = envelope
                    .d
                    .and_then(|d| serde_json::from_str::<Hello>(d.get()).ok())
                    .map(|h| h.heartbeat_interval)
                    .filter(|&ms| ms > 0)
                    // An absurd interval is capped (beating early is allowed);
                    // it must not overflow the timer.
                    .map(|ms| ms.min(3_600_000));
                let Some(interval) = interval else {
                    close(sink, gateway::CLOSE_RESUMABLE, "bad HELLO").await;
                    return Err(Disconnect::transport(format!(
                        "HELLO without a usable heartbeat_interval: {}",
                        envelope.raw_d()
                    )));
                };
                let jitter: f64 = rand::rng().random();
                conn.heartbeat = Some(Heartbeat::start(
                    Duration::from_millis(interval),
                    jitter,
                    Instant::now(),
                ));
                match (conn.identify.take(), self.resume_payload()) {
                    (None, Some(resume)) => {
                        self.set_state(ShardState::Resuming);
                        self.send_frame(sink, conn, resume).await
                    }
                    (permit, _) => {
                        self.set_state(ShardState::Identifying);
                        self.stats.identifies.fetch_add(1, Ordering::Relaxed);
                        let identify = self.identify_payload();
                        let sent = self.send_frame(sink, conn, identify).await;
                        if let Some(permit) = permit {
                            permit.sent();
                        }
                        sent
                    }
                }
            }
            op::RECONNECT => {
                self.report(
                    "reconnect_requested",
                    None,
                    Some(CloseClass::Resumable),
                    Some("Discord asked for a reconnect (op 7)".to_string()),
                    None,
                );
                close(sink, gateway::CLOSE_RESUMABLE, "reconnect requested").await;
                Err(Disconnect::resume_now(
                    CloseClass::Resumable,
                    "closed after op 7".to_string(),
                ))
            }
            op::INVALID_SESSION => {
                let resumable = envelope.raw_d() == "true";
                close(sink, gateway::CLOSE_RESUMABLE, "invalid session").await;
                if resumable && self.session.is_some() {
                    self.report(
                        "invalidated",
                        None,
                        Some(CloseClass::Resumable),
                        Some("Discord invalidated the session (op 9, resumable)".to_string()),
                        None,
                    );
                    Err(Disconnect::resume_now(
                        CloseClass::Resumable,
                        "closed after op 9 (resumable)".to_string(),
                    ))
                } else {
                    self.report(
                        "invalidated",
                        None,
                        Some(CloseClass::Reidentify),
                        Some("Discord invalidated the session (op 9, not resumable)".to_string()),
                        None,
                    );
                    Err(Disconnect::Reidentify {
                        event: "closed",
                        close_code: None,
                        detail: "closed after op 9 (not resumable)".to_string(),
                        invalid_session: true,
                    })
                }
            }
            other => {
                tracing::debug!(
                    shard = self.id(),
                    op = other,
                    "ignoring unknown opcode from Discord"
                );
                Ok(())
            }
        }
    }

    pub(super) fn on_ready(&mut self, conn: &mut Connection, d: &str) {
        match serde_json::from_str::<Ready>(d) {
            Ok(ready) => {
                conn.active = true;
                let resume_url = ready
                    .resume_gateway_url
                    .unwrap_or_else(|| self.config.gateway_url.clone());
                self.session = Some((ready.session_id.clone(), resume_url.clone()));
                // A new sequence: nothing of it is in a restored cache.
                self.stats.cache_skip.store(0, Ordering::Relaxed);
                let generation = self.stats.session_gen.fetch_add(1, Ordering::Relaxed) + 1;
                self.stats
                    .remember_session_id(generation, &ready.session_id);
                self.stats.resume_cap.store(u64::MAX, Ordering::Relaxed);
                self.set_session(SessionInfo {
                    session_id: Some(ready.session_id),
                    resume_url: Some(resume_url),
                    started: Some(std::time::Instant::now()),
                });
                self.set_state(ShardState::Active);
                self.report(
                    "ready",
                    None,
                    None,
                    Some("session started (READY)".to_string()),
                    None,
                );
            }
            Err(e) => {
                conn.active = true;
                self.stats.session_gen.fetch_add(1, Ordering::Relaxed);
                self.set_state(ShardState::Active);
                self.report("ready", None, None, Some(format!("session started (READY), but READY has no usable session_id ({e}): this session cannot be resumed; a lost connection will identify again")), None);
            }
        }
    }
}
