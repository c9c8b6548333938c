//! Signal handling with the Go runtime linked into the process.

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
