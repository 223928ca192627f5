//! Runs the embedded Discord simulator alone, for pointing a bot library at it by hand:
//!
//! ```text
//! cargo run --example simulator -- [SHARDS] [GUILDS_PER_SHARD]
//! ```
//! It prints the REST base, the gateway URL and the token, then a member posts a message in
//! the first text channel of every guild each 5 s until Ctrl-C.

use std::time::Duration;

use shardwarden::simulator::{SimConfig, Simulator, world};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let shards: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let guilds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let sim = Simulator::start(SimConfig {
        shards,
        guilds_per_shard: guilds,
        ..SimConfig::default()
    })
    .await?;
    let cfg = sim.config();
    println!("api_base  {}", sim.api_base());
    println!("gateway   {}", sim.gateway_url());
    println!("token     {}", cfg.token);
    println!("shards    {shards}");
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        for shard in 0..shards {
            for g in sim.shard_guilds(shard) {
                n += 1;
                let channel = world::text_channel_ids(g)[0];
                sim.member_message(channel, &format!("hello #{n}"));
            }
        }
    }
}
