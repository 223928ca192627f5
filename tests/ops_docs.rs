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

/// `shardwarden --version` is one line naming the version and the commit
/// (build.rs), as .ci/package-test and bug reports expect.
#[test]
fn version_names_the_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardwarden"))
        .arg("--version")
        .output()
        .expect("run shardwarden --version");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let prefix = concat!("shardwarden ", env!("CARGO_PKG_VERSION"), " (commit ");
    let commit = text
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("--version: {text:?}"));
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        hash == "unknown" || (hash.len() >= 7 && hash.chars().all(|c| c.is_ascii_hexdigit())),
        "--version: {text:?}"
    );
}

/// Every build.rs output the .deb's assets name (`target/release/generated/…`
/// in Cargo.toml) exists after a build, and the packaged unit differs from
/// systemd/shardwarden.service only in ExecStart's directory.
#[test]
fn package_assets_from_build_rs_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("[package.metadata.deb] assets");
    // The binary's directory is the profile's target directory.
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_shardwarden"))
        .parent()
        .unwrap();
    let mut generated = 0;
    for asset in assets {
        let source = asset[0].as_str().unwrap();
        let Some(rel) = source.strip_prefix("target/release/generated/") else {
            continue;
        };
        generated += 1;
        let path = profile_dir.join("generated").join(rel);
        let found = match rel.strip_suffix("*.1") {
            Some(dir) => std::fs::read_dir(profile_dir.join("generated").join(dir))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.path().extension().is_some_and(|x| x == "1"))
                })
                .unwrap_or(false),
            None => path.is_file(),
        };
        assert!(found, "{source}: build.rs wrote no {}", path.display());
    }
    assert!(
        generated >= 5,
        "man pages, 3 completions and the unit: {generated}"
    );

    let unit = std::fs::read_to_string(root.join("systemd/shardwarden.service")).unwrap();
    let packaged =
        std::fs::read_to_string(profile_dir.join("generated/shardwarden.service")).unwrap();
    assert_eq!(
        packaged,
        unit.replace(
            "ExecStart=/usr/local/bin/shardwarden ",
            "ExecStart=/usr/bin/shardwarden "
        )
    );
    assert!(packaged.contains(
        "\nExecStart=/usr/bin/shardwarden run --config /etc/shardwarden/shardwarden.toml\n"
    ));
}
