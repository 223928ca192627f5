//! `shardwarden demo` as a user, CI or a container runtime runs it: the
//! release binary, stopped by SIGTERM or SIGINT, two at once, and a demo
//! whose own daemon cannot start.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shardwarden");
const WAIT: Duration = Duration::from_secs(20);

struct Demo {
    child: Child,
    /// Lines of stdout and stderr, as they come.
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(BIN)
            .arg("demo")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn demo");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Demo {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for a line containing `what`; returns it.
    fn expect_line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        if let Some(line) = self.seen.iter().find(|l| l.contains(what)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {what:?}; output:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The run's directory, from the first line.
    fn socket(&mut self) -> PathBuf {
        let line = self.expect_line("daemon socket ");
        PathBuf::from(line.rsplit("daemon socket ").next().expect("path"))
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Collect what is left of the output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "demo did not exit; output:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_and_sigint_both_stop_the_demo_cleanly() {
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut demo = Demo::start(&[]);
        let socket = demo.socket();
        demo.expect_line("demo-bot: cursor");
        demo.signal(signal);
        assert_eq!(demo.wait_exit(), 0, "{name}: {}", demo.seen.join("\n"));
        demo.expect_line(&format!("demo: stopping ({name})"));
        demo.expect_line("demo: daemon stopped cleanly");
        let dir = socket.parent().expect("run dir");
        assert!(!dir.exists(), "{name}: its own directory is removed");
    }
}

#[test]
fn two_demos_at_once_each_have_their_own_socket_and_state() {
    let mut first = Demo::start(&[]);
    let mut second = Demo::start(&[]);
    let (a, b) = (first.socket(), second.socket());
    assert_ne!(a, b);
    first.expect_line("demo-bot: cursor");
    second.expect_line("demo-bot: cursor");
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit(), 0, "{}", second.seen.join("\n"));
    // Stopping one leaves the other running, its socket in place.
    assert!(first.child.try_wait().expect("wait").is_none());
    assert!(a.exists());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(), 0, "{}", first.seen.join("\n"));
}

#[test]
fn a_demo_whose_daemon_cannot_start_says_so_and_ends() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_str().expect("utf-8 path");
    let mut first = Demo::start(&["--dir", dir]);
    first.socket();
    first.expect_line("demo-bot: cursor");
    let state = tmp.path().join("state");
    let deadline = Instant::now() + WAIT;
    while !state.join("state.json").exists() {
        assert!(Instant::now() < deadline, "the first demo saved no state");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before: Vec<_> = std::fs::read_dir(&state)
        .expect("state dir")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    // A second demo on the same directory: its daemon cannot bind the
    // socket the first one is serving.
    let mut second = Demo::start(&["--dir", dir]);
    let code = second.wait_exit();
    assert_eq!(code, 1, "{}", second.seen.join("\n"));
    let error = second.expect_line("error: the demo's daemon failed");
    assert!(error.contains("bot.sock"), "{error}");
    // It took nothing of the first demo's: state and socket are still there,
    // and the first demo runs on.
    assert!(tmp.path().join("bot.sock").exists());
    for name in before {
        assert!(state.join(&name).exists(), "{name:?} was deleted");
    }
    assert!(first.child.try_wait().expect("wait").is_none());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(), 0, "{}", first.seen.join("\n"));
    assert!(
        tmp.path().exists(),
        "a directory given with --dir is left alone"
    );
}
