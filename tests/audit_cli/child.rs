//! Running the built `tailgres audit`, to completion or following a file.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest a child may take before the test fails (it is never waited
/// for this long when it works).
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tailgres audit ARGS` to completion (stdin from `input`, or empty).
pub fn audit(args: &[&str], input: Option<&[u8]>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .arg("audit")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let input = input.map(<[u8]>::to_vec);
    let feeder = std::thread::spawn(move || {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            let _ = stdin.write_all(&input);
        }
    });
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait(&mut child);
    feeder.join().unwrap();
    let run = Run { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() };
    assert!(!run.stderr.contains("panicked"), "tailgres audit {args:?} panicked:\n{}", run.stderr);
    run
}

pub fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8(s).expect("output is UTF-8")
    })
}

pub fn wait(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tailgres audit did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `tailgres audit --follow` child and its output lines as they come.
pub struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Follower {
    pub fn start(args: &[&str]) -> Follower {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tailgres"))
            .args(["audit", "--follow"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = drain(child.stderr.take().unwrap());
        Follower { child, lines, stderr }
    }

    /// The next output line, waiting for it as long as it takes (up to
    /// [`PATIENCE`]).
    pub fn next(&self) -> String {
        self.lines.recv_timeout(PATIENCE).unwrap_or_else(|e| panic!("no line from tailgres audit -f: {e}"))
    }

    /// SIGINT, then the exit status and stderr.
    pub fn interrupt(mut self) -> (ExitStatus, String, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        let status = wait(&mut self.child);
        let rest = self.lines.iter().collect();
        (status, self.stderr.join().unwrap(), rest)
    }
}

pub fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}
