//! Discord-side incident detection: failures that arrive together from
//! places this host does not share point at Discord rather than at the bot.
//!
//! Two kinds of evidence feed one detector (held by the hub, so the
//! supervisor, the `/gateway/bot` re-reads and the front door's REST
//! forward all report to the same place):
//! - **gateway**: a shard lost its connection (`closed` or `zombie`, not a
//!   fatal close code);
//! - **REST**: a call failed Discord-side (5xx or transport, after the
//!   front door's retries), or Discord answered (anything below 500).
//!
//! A suspected incident is raised, once, when within the window either
//! more than half the shards (and at least two) lost their connections, or
//! REST calls failed Discord-side on at least [`REST_ROUTES`] different
//! routes, or on two routes while a shard also lost its connection. It is
//! reported as one `incident` message (DESIGN.md §3.2), in `health` and
//! `status`, and logged as `event=discord_incident_suspected`. It clears
//! (`recovered`) when every shard is active again and REST calls succeed
//! again: a call answered since the last failure, or no failure for
//! [`REST_QUIET`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::hub::{Hub, IncidentReport, SessionReport, ShardState};

/// How far back shard connection losses count together.
const GATEWAY_WINDOW: Duration = Duration::from_secs(20);
/// How far back REST failures count together.
const REST_WINDOW: Duration = Duration::from_secs(30);
/// REST routes failing Discord-side together that alone make an incident.
pub const REST_ROUTES: usize = 3;
/// A REST side with no failure for this long is healthy even if no call
/// has succeeded since (nothing may have been sent).
pub const REST_QUIET: Duration = Duration::from_secs(300);
/// Routes named in the incident's detail.
const ROUTES_SHOWN: usize = 5;

/// The detector: one per daemon, in the hub.
#[derive(Default)]
pub struct IncidentDetector {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Shard connection losses in the window.
    gateway: VecDeque<(Instant, u32)>,
    /// Discord-side REST failures in the window, by route template.
    rest: VecDeque<(Instant, String)>,
    /// The latest Discord-side REST failure.
    last_rest_failure: Option<Instant>,
    /// Discord answered a REST call after that failure.
    rest_answered_since: bool,
    /// An incident is in progress.
    active: bool,
}

impl IncidentDetector {
    /// A shard's session report. Returns the `incident` message to publish
    /// when the incident state changes.
    pub fn gateway(&self, report: &SessionReport, hub: &Hub) -> Option<IncidentReport> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(report.event, "closed" | "zombie") && report.class != Some("fatal") {
            state.gateway.push_back((Instant::now(), report.shard));
        }
        state.decide(hub)
    }

    /// A REST call's outcome on `route` (a template without ids or
    /// tokens): `failed` when it failed Discord-side (5xx, transport),
    /// otherwise Discord answered it.
    pub fn rest(&self, route: &str, failed: bool, hub: &Hub) -> Option<IncidentReport> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if failed {
            state.rest.push_back((now, route.to_string()));
            state.last_rest_failure = Some(now);
            state.rest_answered_since = false;
        } else {
            // The common case, nothing failed: nothing to decide.
            state.last_rest_failure?;
            state.rest_answered_since = true;
        }
        state.decide(hub)
    }

    /// Called now and then: an incident whose REST side went quiet clears
    /// once the shards are back, even when no call is made.
    pub fn tick(&self, hub: &Hub) -> Option<IncidentReport> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.active {
            return None;
        }
        state.decide(hub)
    }
}

impl State {
    fn decide(&mut self, hub: &Hub) -> Option<IncidentReport> {
        let now = Instant::now();
        while self
            .gateway
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > GATEWAY_WINDOW)
        {
            self.gateway.pop_front();
        }
        while self
            .rest
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > REST_WINDOW)
        {
            self.rest.pop_front();
        }
        if self.active {
            return self.recovered(hub, now);
        }
        let owned = hub.owned().count();
        let mut shards: Vec<u32> = self.gateway.iter().map(|&(_, s)| s).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut routes: Vec<&str> = self.rest.iter().map(|(_, r)| r.as_str()).collect();
        routes.sort_unstable();
        routes.dedup();
        let gateway_says = owned >= 2 && shards.len() >= (owned / 2 + 1).max(2);
        let rest_says = routes.len() >= REST_ROUTES || (routes.len() >= 2 && !shards.is_empty());
        if !gateway_says && !rest_says {
            return None;
        }
        self.active = true;
        let mut evidence = Vec::new();
        if !shards.is_empty() {
            evidence.push(format!(
                "{} of {owned} shards lost their connections within {} s (shards {shards:?})",
                shards.len(),
                GATEWAY_WINDOW.as_secs()
            ));
        }
        if !routes.is_empty() {
            let more = routes.len().saturating_sub(ROUTES_SHOWN);
            let mut named = routes[..routes.len().min(ROUTES_SHOWN)].join(", ");
            if more > 0 {
                named.push_str(&format!(" and {more} more"));
            }
            evidence.push(format!(
                "REST calls failed Discord-side (5xx or no answer) on {} routes within {} s ({named})",
                routes.len(),
                REST_WINDOW.as_secs()
            ));
        }
        let detail = format!(
            "{}: a Discord-side incident is likely, not a fault of this bot; preferring resumes and slowing re-identifies (check https://discordstatus.com)",
            evidence.join("; ")
        );
        tracing::warn!(
            event = %"discord_incident_suspected",
            class = %"incident",
            shards = shards.len(),
            owned,
            routes = routes.len(),
            "{detail}"
        );
        Some(IncidentReport::new(
            IncidentReport::SUSPECTED,
            shards,
            detail,
        ))
    }

    /// The `recovered` report once both sides are healthy again.
    fn recovered(&mut self, hub: &Hub, now: Instant) -> Option<IncidentReport> {
        let shards_back = hub
            .owned()
            .all(|s| matches!(s.state(), ShardState::Active | ShardState::Fatal));
        let rest_back = match self.last_rest_failure {
            None => true,
            Some(at) => self.rest_answered_since || now.duration_since(at) >= REST_QUIET,
        };
        if !(shards_back && rest_back) {
            return None;
        }
        *self = State::default();
        let detail = "every shard is active and Discord answers REST calls again; normal identify pacing restored".to_string();
        tracing::info!(
            event = %"discord_incident_recovered",
            class = %"incident",
            "{detail}"
        );
        // The shards the incident was about.
        let shards = hub.incident().map(|i| i.shards).unwrap_or_default();
        Some(IncidentReport::new(
            IncidentReport::RECOVERED,
            shards,
            detail,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::event_log::EventLog;
    use crate::hub::IdentifyBudget;

    fn hub(shards: &[u32]) -> Hub {
        let hub = Hub::new(
            EventLog::new(1, 1 << 20),
            shards,
            shards.len() as u32,
            Vec::new(),
            HashMap::new(),
            IdentifyBudget::default(),
        );
        for s in &hub.shards {
            s.set_state(ShardState::Active);
        }
        hub
    }

    fn closed(shard: u32) -> SessionReport {
        let mut report = SessionReport::new(shard, "closed");
        report.class = Some("transport");
        report
    }

    #[tokio::test(start_paused = true)]
    async fn correlated_failures_are_an_incident_message_not_a_session_event() {
        let hub = hub(&[0, 1, 2, 3]);
        let mut lines = hub.sessions.subscribe();
        let detector = IncidentDetector::default();
        assert!(detector.gateway(&closed(1), &hub).is_none());
        assert!(detector.gateway(&closed(3), &hub).is_none());
        let incident = detector.gateway(&closed(2), &hub).expect("3 of 4 shards");
        hub.report_incident(&incident);
        let line: serde_json::Value =
            serde_json::from_slice(&lines.recv().await.expect("line")).expect("json");
        assert_eq!(line["op"], "incident");
        assert_eq!(line["state"], "suspected");
        assert_eq!(line["shards"], serde_json::json!([1, 2, 3]));
        assert!(line.get("shard").is_none() && line.get("event").is_none());
        assert!(
            hub.owned().all(|s| s.last_report().is_none()),
            "not stamped on any shard"
        );
        let health: serde_json::Value = serde_json::from_slice(&hub.health_line()).expect("json");
        assert_eq!(health["incident"]["state"], "suspected");
        assert_eq!(health["incident"]["shards"], serde_json::json!([1, 2, 3]));

        let recovered = detector
            .gateway(&SessionReport::new(2, "resumed"), &hub)
            .expect("every shard is back");
        hub.report_incident(&recovered);
        let line: serde_json::Value =
            serde_json::from_slice(&lines.recv().await.expect("line")).expect("json");
        assert_eq!(
            (&line["op"], &line["state"]),
            (&"incident".into(), &"recovered".into())
        );
        assert_eq!(line["shards"], serde_json::json!([1, 2, 3]));
        let health: serde_json::Value = serde_json::from_slice(&hub.health_line()).expect("json");
        assert!(health["incident"].is_null());
        assert_eq!(hub.incidents.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rest_failures_on_several_routes_are_one_incident_until_calls_succeed() {
        let hub = hub(&[0]);
        let detector = IncidentDetector::default();
        // Repeated failures of one route are that route's problem.
        for _ in 0..10 {
            assert!(detector.rest("GET /channels/:id", true, &hub).is_none());
        }
        assert!(
            detector
                .rest("POST /channels/:id/messages", true, &hub)
                .is_none()
        );
        // Successes elsewhere do not clear what is not raised.
        assert!(detector.rest("GET /users/@me", false, &hub).is_none());
        let incident = detector
            .rest("GET /guilds/:id", true, &hub)
            .expect("three routes");
        assert_eq!(incident.state, IncidentReport::SUSPECTED);
        assert!(incident.shards.is_empty());
        assert!(
            incident.detail.contains("3 routes") && incident.detail.contains("GET /guilds/:id"),
            "{}",
            incident.detail
        );
        hub.report_incident(&incident);
        // More failures: still one incident.
        assert!(detector.rest("DELETE /channels/:id", true, &hub).is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        let recovered = detector
            .rest("GET /channels/:id", false, &hub)
            .expect("Discord answers again");
        assert_eq!(recovered.state, IncidentReport::RECOVERED);
        hub.report_incident(&recovered);
        assert!(hub.incident().is_none());
        // The slate is clean: two new failures are not an incident.
        assert!(detector.rest("GET /a", true, &hub).is_none());
        assert!(detector.rest("GET /b", true, &hub).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn two_failing_routes_with_a_lost_shard_are_an_incident() {
        let hub = hub(&[0, 1, 2, 3]);
        let detector = IncidentDetector::default();
        assert!(detector.rest("GET /a", true, &hub).is_none());
        assert!(detector.rest("GET /b", true, &hub).is_none());
        hub.shards[2].set_state(ShardState::Reconnecting);
        let incident = detector
            .gateway(&closed(2), &hub)
            .expect("REST and gateway");
        assert_eq!(incident.shards, vec![2]);
        assert!(
            incident.detail.contains("1 of 4 shards"),
            "{}",
            incident.detail
        );
        assert!(incident.detail.contains("2 routes"), "{}", incident.detail);
        hub.report_incident(&incident);
        // REST answers, but a shard is still down: not over.
        assert!(detector.rest("GET /a", false, &hub).is_none());
        hub.shards[2].set_state(ShardState::Active);
        let recovered = detector
            .gateway(&SessionReport::new(2, "resumed"), &hub)
            .expect("both sides healthy");
        assert_eq!(recovered.state, IncidentReport::RECOVERED);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_apart_in_time_are_not_together() {
        let hub = hub(&[0, 1]);
        let detector = IncidentDetector::default();
        assert!(detector.rest("GET /a", true, &hub).is_none());
        tokio::time::advance(REST_WINDOW + Duration::from_secs(1)).await;
        assert!(detector.rest("GET /b", true, &hub).is_none());
        tokio::time::advance(REST_WINDOW + Duration::from_secs(1)).await;
        assert!(detector.rest("GET /c", true, &hub).is_none());
        assert!(detector.gateway(&closed(0), &hub).is_none());
        tokio::time::advance(GATEWAY_WINDOW + Duration::from_secs(1)).await;
        assert!(detector.gateway(&closed(1), &hub).is_none());
        // A fatal close is this bot's problem, never an incident.
        let mut fatal = closed(0);
        fatal.class = Some("fatal");
        assert!(detector.gateway(&fatal, &hub).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_rest_side_clears_without_calls() {
        let hub = hub(&[0]);
        let detector = IncidentDetector::default();
        for route in ["GET /a", "GET /b", "GET /c"] {
            if let Some(incident) = detector.rest(route, true, &hub) {
                hub.report_incident(&incident);
            }
        }
        assert!(hub.incident().is_some());
        assert!(detector.tick(&hub).is_none());
        tokio::time::advance(REST_QUIET).await;
        let recovered = detector.tick(&hub).expect("quiet for long enough");
        assert_eq!(recovered.state, IncidentReport::RECOVERED);
    }
}
