//! Routing a bot's gateway command (the §3.3 `send`) to the shard(s) that
//! must send it, through each shard's command queue and send limiter. Shared
//! by every way commands come in: the bot socket and NATS requests.

use std::future::Future;

use bytes::Bytes;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use crate::hub::{Hub, OutboundCommand, SendRefusal};
use crate::protocol::{self, ErrorDetail, ProtocolError, SendRequest, SendTarget, code};

/// Which shards `send` needs, when this daemon owns them all.
pub fn shards_for(hub: &Hub, send: &SendRequest) -> Vec<u32> {
    match send.target {
        SendTarget::Shard(shard) => vec![shard],
        SendTarget::Guild(guild) => vec![hub.shard_for_guild(guild)],
        SendTarget::GuildIds => {
            let mut shards: Vec<u32> = send
                .command
                .guild_ids()
                .unwrap_or_default()
                .into_iter()
                .map(|g| hub.shard_for_guild(g))
                .collect();
            shards.sort_unstable();
            shards.dedup();
            shards
        }
    }
}

fn owned(hub: &Hub) -> String {
    let mut owned: Vec<u32> = hub.owned().map(|s| s.shard).collect();
    owned.sort_unstable();
    format!("it owns {owned:?} of {}", hub.shard_total)
}

/// Route `send`: `Err` with the `error` line when it is refused at once,
/// else a future that resolves to the `sent` or `error` line once every
/// shard involved has written (or refused) its part.
pub fn route(
    hub: &Hub,
    send: SendRequest,
) -> Result<impl Future<Output = Bytes> + Send + 'static, Bytes> {
    let SendRequest {
        id,
        target,
        command,
    } = send;
    let refuse = |code, message: String| {
        ProtocolError::new(code, message)
            .with_id(Some(id.clone()))
            .line()
    };
    let parts: Vec<(u32, String)> = match target {
        SendTarget::Shard(shard) => {
            if hub.shard(shard).is_none() {
                return Err(refuse(
                    code::SHARD_NOT_OWNED,
                    format!("shard {shard} is not owned by this daemon ({})", owned(hub)),
                ));
            }
            vec![(shard, command.payload)]
        }
        SendTarget::Guild(guild) => {
            let shard = hub.shard_for_guild(guild);
            if hub.shard(shard).is_none() {
                return Err(refuse(
                    code::SHARD_NOT_OWNED,
                    format!(
                        "guild {guild} belongs to shard {shard}, which this daemon does not own ({})",
                        owned(hub)
                    ),
                ));
            }
            vec![(shard, command.payload)]
        }
        SendTarget::GuildIds => {
            // Checked when parsed.
            let guilds = command.guild_ids().unwrap_or_default();
            let mut by_shard: Vec<(u32, Vec<u64>)> = Vec::new();
            for guild in guilds {
                let shard = hub.shard_for_guild(guild);
                match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                    Some((_, ids)) => ids.push(guild),
                    None => by_shard.push((shard, vec![guild])),
                }
            }
            let unowned: Vec<String> = by_shard
                .iter()
                .filter(|(shard, _)| hub.shard(*shard).is_none())
                .map(|(shard, ids)| format!("{ids:?} → shard {shard}"))
                .collect();
            if !unowned.is_empty() {
                return Err(refuse(
                    code::SHARD_NOT_OWNED,
                    format!(
                        "guilds {} are on shards this daemon does not own ({}); nothing was sent",
                        unowned.join(", "),
                        owned(hub)
                    ),
                ));
            }
            if by_shard.len() == 1 {
                vec![(by_shard[0].0, command.payload)]
            } else {
                by_shard
                    .iter()
                    .map(|(shard, ids)| (*shard, command.payload_for_guilds(ids)))
                    .collect()
            }
        }
    };

    let split = parts.len() > 1;
    let mut queued = Vec::with_capacity(parts.len());
    let mut failure: Option<(u32, SendRefusal)> = None;
    for (shard, payload) in parts {
        let (reply, replied) = oneshot::channel();
        let command = OutboundCommand { payload, reply };
        let refused = match hub.commands.get(&shard).map(|tx| tx.try_send(command)) {
            Some(Ok(())) => {
                queued.push((shard, replied));
                continue;
            }
            Some(Err(TrySendError::Full(_))) => format!(
                "shard {shard}'s command queue is full (it is rate limited or reconnecting); retry later"
            ),
            Some(Err(TrySendError::Closed(_))) | None => {
                format!("shard {shard} is not running")
            }
        };
        failure = Some((
            shard,
            SendRefusal {
                code: code::SHARD_UNAVAILABLE,
                message: refused,
            },
        ));
        break;
    }
    if queued.is_empty() {
        let (_, refusal) = failure.expect("at least one part");
        return Err(refuse(refusal.code, refusal.message));
    }

    Ok(async move {
        let mut sent = Vec::with_capacity(queued.len());
        // Parts go out in order; the first one refused is reported.
        let mut refused: Option<(u32, SendRefusal)> = None;
        for (shard, replied) in queued {
            let refusal = match replied.await {
                Ok(Ok(())) => {
                    sent.push(shard);
                    continue;
                }
                Ok(Err(refusal)) => refusal,
                Err(_) => SendRefusal {
                    code: code::SHARD_UNAVAILABLE,
                    message: format!(
                        "shard {shard} dropped the command without sending it (reconnecting or stopping); retry"
                    ),
                },
            };
            refused.get_or_insert((shard, refusal));
        }
        match refused.or(failure) {
            None => protocol::sent_line(&id, &sent),
            Some((shard, refusal)) => {
                let message = if split {
                    format!("shard {shard}: {}", refusal.message)
                } else {
                    refusal.message
                };
                let mut error = ProtocolError::new(refusal.code, message).with_id(Some(id));
                if !sent.is_empty() {
                    error = error.with_detail(ErrorDetail {
                        sent_shards: Some(sent),
                        ..ErrorDetail::default()
                    });
                }
                tracing::debug!(code = error.code, message = %error.message, "send refused");
                error.line()
            }
        }
    })
}
