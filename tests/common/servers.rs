//! Real servers the cluster tests need (Debian's `nats-server`), started on a
//! free loopback port with their data in a temporary directory, stopped on
//! drop. `.ci/run` installs them; elsewhere a missing binary skips the test
//! with a printed reason (under `CI` it fails).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether `binary` is on the PATH (or under /usr/sbin); prints why a test
/// skips when not, and fails under CI, where `.ci/run` installs it.
pub fn have(binary: &str) -> Option<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let path = Path::new(dir).join(binary);
        if path.is_file() {
            return Some(path);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{binary} is missing under CI: .ci/run should have installed it"
    );
    eprintln!("SKIPPED: {binary} is not installed (apt-get install {binary}, or run .ci/run)");
    None
}

/// A `nats-server -js` on a loopback port.
pub struct Nats {
    child: Option<Child>,
    binary: PathBuf,
    /// Client port.
    pub port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    /// Start one, or `None` (skipped) when nats-server is not installed.
    pub async fn start() -> Option<Nats> {
        let binary = have("nats-server")?;
        let mut nats = Nats {
            child: None,
            binary,
            port: free_port(),
            store: tempfile::tempdir().expect("tempdir"),
        };
        nats.up().await;
        Some(nats)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start (again, with the same port and store).
    pub async fn up(&mut self) {
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    /// Stop it (kill -9: an outage, not a clean shutdown).
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.down();
    }
}
