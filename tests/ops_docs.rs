//! The operator-facing files agree with the code: the example configs load
//! and pass intent validation, and the close-code tables in README.md and
//! docs/runbook.md match `gateway::CLOSE_CODES`.

use std::path::Path;

use shardwarden::config::Config;
use shardwarden::gateway::CLOSE_CODES;
use shardwarden::intents;

fn load(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Err(errors) = intents::plan(&config.discord.intents, &config.discord.events) {
        panic!("{name}: intents/events do not validate: {errors:?}");
    }
    config
}

#[test]
fn example_configs_load() {
    load("config/shardwarden.toml");
    let cluster = load("config/cluster-host-a.toml");
    assert!(cluster.cluster.is_some() && cluster.broker.is_some());
    let demo = load("config/demo.toml");
    assert!(demo.discord.api_base.starts_with("http://127.0.0.1:"));
}

/// `| 4004 | Authentication failed | **fatal** | ...` → (4004, name, class).
fn close_rows(text: &str) -> Vec<(u16, String, String)> {
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let code = cells.get(1)?.parse::<u16>().ok()?;
            let name = cells.get(2)?.to_string();
            let class = cells.get(3)?.trim_matches('*').to_string();
            Some((code, name, class))
        })
        .collect()
}

#[test]
fn close_code_tables_match_the_code() {
    for doc in ["README.md", "docs/runbook.md"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
        let rows = close_rows(&text);
        assert_eq!(rows.len(), CLOSE_CODES.len(), "{doc}: {rows:?}");
        for row in CLOSE_CODES {
            let found = rows
                .iter()
                .find(|(code, ..)| *code == row.code)
                .unwrap_or_else(|| panic!("{doc} has no row for {}", row.code));
            assert_eq!(found.1, row.name, "{doc}: name of {}", row.code);
            assert_eq!(found.2, row.class.as_str(), "{doc}: class of {}", row.code);
        }
    }
}
