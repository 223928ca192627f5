//! Build-time outputs that must match the binary they ship with:
//!
//! - `SHARDWARDEN_COMMIT` for `shardwarden --version`: the git commit built,
//!   `-dirty` when what goes into the binary differs from it, "unknown"
//!   outside a git checkout (a crate tarball). A packager building from a
//!   tarball can set `SHARDWARDEN_COMMIT` in the environment instead.
//! - The man pages and the bash, zsh and fish completions, rendered from
//!   src/cli.rs, the same clap definitions main.rs parses.
//! - The packaged systemd unit: systemd/shardwarden.service with the binary
//!   at /usr/bin instead of /usr/local/bin.
//!
//! The last two are written to `$OUT_DIR` and copied to `generated/` in the
//! profile's target directory (`target/release/generated/`), where the
//! `[package.metadata.deb]` assets in Cargo.toml pick them up: cargo-deb
//! resolves `target/release/` to the real target directory, and this is
//! that directory as seen from `$OUT_DIR` (`<profile>/build/<pkg>-<hash>/out`).

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use clap_complete::Shell;

/// The man pages' version line; `--version` adds the commit (main.rs).
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[path = "src/cli.rs"]
#[allow(dead_code)] // build.rs reads the definitions, never the parsed values.
mod cli;

/// The repository's unit runs a from-source install in /usr/local/bin.
const UNIT_EXEC_FROM_SOURCE: &str = "ExecStart=/usr/local/bin/shardwarden ";
const UNIT_EXEC_PACKAGED: &str = "ExecStart=/usr/bin/shardwarden ";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    println!(
        "cargo:rustc-env=SHARDWARDEN_COMMIT={}",
        commit(&manifest_dir)
    );

    let out_dir = PathBuf::from(env("OUT_DIR"));
    let generated = out_dir.join("generated");
    let _ = std::fs::remove_dir_all(&generated);
    create_dir(&generated.join("man"));
    create_dir(&generated.join("completions"));

    println!("cargo:rerun-if-changed=src/cli.rs");
    clap_mangen::generate_to(cli::Cli::command(), generated.join("man"))
        .unwrap_or_else(|e| panic!("writing the man pages to {}: {e}", generated.display()));
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(
            shell,
            &mut cli::Cli::command(),
            "shardwarden",
            generated.join("completions"),
        )
        .unwrap_or_else(|e| panic!("writing the {shell} completion: {e}"));
    }

    println!("cargo:rerun-if-changed=systemd/shardwarden.service");
    let unit_path = manifest_dir.join("systemd/shardwarden.service");
    let unit = std::fs::read_to_string(&unit_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", unit_path.display()));
    let packaged = packaged_unit(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit_path.display()));
    write(&generated.join("shardwarden.service"), &packaged);

    // `<profile>/build/<pkg>-<hash>/out` → `<profile>/generated`.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let dest = profile_dir.join("generated");
        let _ = std::fs::remove_dir_all(&dest);
        copy_dir(&generated, &dest);
    }
}

/// The unit as the .deb installs it: the same file with ExecStart pointing at
/// /usr/bin. Exactly one ExecStart names the binary; anything else means the
/// unit changed shape and this substitution needs a look.
fn packaged_unit(unit: &str) -> Result<String, String> {
    match unit.matches(UNIT_EXEC_FROM_SOURCE).count() {
        1 => Ok(unit.replace(UNIT_EXEC_FROM_SOURCE, UNIT_EXEC_PACKAGED)),
        n => Err(format!(
            "expected exactly one line starting {UNIT_EXEC_FROM_SOURCE:?}, found {n}: \
             build.rs rewrites it to {UNIT_EXEC_PACKAGED:?} for the .deb"
        )),
    }
}

/// `abc1234`, `abc1234-dirty` or `unknown`.
fn commit(manifest_dir: &Path) -> String {
    println!("cargo:rerun-if-env-changed=SHARDWARDEN_COMMIT");
    if let Ok(commit) = std::env::var("SHARDWARDEN_COMMIT") {
        return commit;
    }
    // Only this crate's own repository counts: a tarball unpacked inside some
    // other checkout must not report that checkout's commit.
    let Some(toplevel) = git(manifest_dir, &["rev-parse", "--show-toplevel"]) else {
        return "unknown".to_string();
    };
    if std::fs::canonicalize(&toplevel).ok() != std::fs::canonicalize(manifest_dir).ok() {
        return "unknown".to_string();
    }
    // Rebuild when HEAD moves: HEAD itself (a branch switch), the branch's ref
    // (a commit) and packed-refs. `--git-path` resolves them in a worktree too.
    // Only existing files: Cargo reruns the script on every build for a
    // missing one.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(head_ref) = git(manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(head_ref);
    }
    for name in watched {
        if let Some(path) = git(manifest_dir, &["rev-parse", "--git-path", &name]) {
            let path = manifest_dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    // What goes into the binary. Watching src/ makes the dirty mark follow
    // edits, which rebuild the crate anyway; Cargo.toml is not watched, since
    // an edit of its package metadata alone would then rebuild everything.
    let inputs = ["src", "build.rs", "Cargo.toml", "Cargo.lock"];
    println!("cargo:rerun-if-changed=src");
    let Some(short) = git(manifest_dir, &["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_string();
    };
    let clean = Command::new("git")
        .current_dir(manifest_dir)
        .args(["diff", "--quiet", "HEAD", "--"])
        .args(inputs)
        .status()
        .is_ok_and(|s| s.success());
    if clean {
        short
    } else {
        format!("{short}-dirty")
    }
}

/// A git command's trimmed stdout, or None when git or the repository is absent.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("Cargo sets {name} for build scripts"))
}

fn create_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn copy_dir(from: &Path, to: &Path) {
    create_dir(to);
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dest);
        } else {
            std::fs::copy(&src, &dest)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dest.display()));
        }
    }
}
