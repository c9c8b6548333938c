//! Signal handling with the Go runtime linked into the process.
mod common;

use tailgres::signals::{Request, Signals};
use tailgres::sys::has_sa_onstack;

/// tokio's handlers get SA_ONSTACK (Go requires it for any handler that may
/// run on a Go thread), and signals still arrive as requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_on_the_alternate_stack_and_still_deliver() {
    // Make sure the Go runtime is really in this process: creating a node
    // (which fails on purpose here, before any network use) calls into Go.
    let err = tailgres::tailnet::EmbeddedNode::start(tailgres::tailnet::NodeConfig {
        state_dir: "/dev/null/impossible".into(),
        hostname: "x".into(),
        auth_key: None,
        control_url: None,
        ephemeral: false,
        advertise_tags: vec![],
        tsnet_log: None,
        env: vec![],
        start_timeout: None,
    })
    .await
    .err()
    .expect("state dir under /dev/null is refused");
    assert!(err.to_string().contains("/dev/null/impossible"), "{err}");

    let mut signals = Signals::new().unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        assert!(has_sa_onstack(sig).unwrap(), "signal {sig} lacks SA_ONSTACK");
    }
    std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert_eq!(signals.recv().await, Request::Reload);
    std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
    assert_eq!(signals.recv().await, Request::Shutdown);
}

/// SIGHUP while the node is still joining the tailnet (an interactive login
/// can take a person minutes) reopens the audit log, as a rotation expects,
/// and the proxy keeps waiting; it once stopped the process. SIGTERM then
/// stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_joining_reopens_the_audit_log_and_keeps_waiting() {
    common::require_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let state = dir.path().join("state");
    // A control server nobody answers at: the node waits to join.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .args(["--upstream", "127.0.0.1:9", "--hostname", "pg", "--control-url", "http://127.0.0.1:9"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--audit-log")
        .arg(&audit)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    // The audit log is opened after the signal handlers are installed.
    common::within("tailgres opens its audit log", async {
        while !audit.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    std::fs::rename(&audit, dir.path().join("audit.jsonl.1")).unwrap();
    std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    common::within("the audit log is reopened", async {
        while !audit.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped tailgres while it was joining");
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = common::within("tailgres stops on SIGTERM", child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
}
