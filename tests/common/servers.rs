//! Real servers the cluster tests need (Debian's `nats-server` and
//! `redis-server`), started on a free loopback port with their data in a
//! temporary directory, stopped on drop, and a TCP proxy to cut a daemon
//! off from one. `.ci/run` installs them; elsewhere a missing binary skips the test
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

/// One plain `GET` on a loopback port (the metrics endpoint): the whole
/// answer, head and body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body
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

/// A `redis-server` on a loopback port (no persistence).
pub struct Redis {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
}

impl Redis {
    /// Start one, or `None` (skipped) when redis-server is not installed.
    pub async fn start() -> Option<Redis> {
        let binary = have("redis-server")?;
        let port = free_port();
        let child = Command::new(binary)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
            ])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let mut redis = Redis {
            child: Some(child),
            port,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        redis.down();
        panic!("redis-server did not listen on {port}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stop it (kill -9).
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down();
    }
}

/// A TCP proxy on a loopback port to `target`: cutting it is a network
/// partition between a daemon and a server (connections reset, new ones
/// refused); restoring it heals the partition on the same port.
pub struct Proxy {
    /// Listening port.
    pub port: u16,
    target: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    /// Forward `127.0.0.1:PORT` to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let proxy = Proxy {
            port,
            target,
            tasks: Default::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let conns = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Cut: close the listener and every forwarded connection.
    pub fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Heal the partition: listen on the same port again.
    pub async fn restore(&self) {
        for _ in 0..100 {
            if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot listen on {} again", self.port);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
