//! Tamper evidence end to end: a real proxy, real sessions through the
//! tailnet, SIGHUP rotation twice and a restart onto the same log, with a
//! checkpoint key made by `tailgres audit keygen`. `tailgres audit verify`
//! (the binary) accepts the files in any order, with the key pinned and
//! the checkpoint copies from the proxy's own log; and rejects, naming the
//! right line or file, an edited line, a deleted line, a reordered pair, a
//! missing rotated file, a deleted tail and another key.
mod common;

use common::lab::{psql, LabOptions, LabUp};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tailgres(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tailgres")).args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One psql session through the proxy, waited for until its session_end
/// is in the log.
async fn session(lab: &LabUp, app: &str) {
    let (host, port) = lab.forward_host_port(0);
    let conninfo =
        format!("host={host} port={port} user=role_scram dbname=app sslmode=require application_name={app}");
    let (ok, out, err) = psql(&conninfo, Some("scram-pass"), "select 1").await;
    assert!(ok && out.trim() == "1", "{app}: {err}");
    lab.wait_record(&format!("session_end of {app}"), |r| {
        r["event"] == "session_end" && r["postgres"]["application_name"] == app
    })
    .await;
}

async fn sighup(lab: &LabUp) {
    let pid = lab.info["proxy"]["pid"].as_u64().expect("proxy pid").to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().await.unwrap().success());
}

/// Moves the current log to `to` and has the proxy reopen it.
async fn rotate(lab: &LabUp, log: &Path, to: &Path) {
    std::fs::rename(log, to).unwrap();
    sighup(lab).await;
    wait_until("the proxy to reopen its audit log", || log.exists()).await;
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The 1-based line of `path` whose record has this application name and event.
fn line_of(path: &Path, app: &str, event: &str) -> usize {
    lines(path)
        .iter()
        .position(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["event"] == event && v["postgres"]["application_name"] == app
        })
        .unwrap_or_else(|| panic!("no {event} of {app} in {}", path.display()))
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_a_real_log_and_names_each_kind_of_damage() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit-signing.pem");
    let (code, public, err) = tailgres(&["audit", "keygen", key.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let public = public.trim().to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");

    let log = dir.path().join("audit.jsonl");
    let (r2, r1) = (dir.path().join("audit.jsonl.2"), dir.path().join("audit.jsonl.1"));
    let key_flag = format!("--audit-signing-key={}", key.display());
    let options = || LabOptions {
        audit_log: Some(log.clone()),
        tailgres_args: vec![&key_flag, "--audit-checkpoint-every=4"],
        ..Default::default()
    };
    let mut shipped = String::new();

    let lab = LabUp::start(options()).await;
    session(&lab, "first").await;
    session(&lab, "second").await;
    rotate(&lab, &log, &r2).await;
    session(&lab, "third").await;
    rotate(&lab, &log, &r1).await;
    session(&lab, "fourth").await;
    // The checkpoints' second copies, as a log shipper would have them.
    shipped.push_str(&std::fs::read_to_string(lab.proxy_log()).unwrap());
    lab.stop().await;

    // A restart onto the same log: the chain goes on from its last line.
    let lab = LabUp::start(options()).await;
    session(&lab, "fifth").await;
    shipped.push_str(&std::fs::read_to_string(lab.proxy_log()).unwrap());
    lab.stop().await;

    let all: Vec<Value> =
        [&r2, &r1, &log].iter().flat_map(|p| common::audit::validate_all_lines(p)).collect();
    let seqs: Vec<u64> = all.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    // The lab moved its own probe record (seq 1 and 2) away before the test's
    // sessions, as an operator's rotation would.
    assert_eq!(
        seqs,
        (3..3 + all.len() as u64).collect::<Vec<_>>(),
        "one chain over three files and two runs"
    );
    let opened: Vec<&str> =
        all.iter().filter(|v| v["event"] == "log_opened").map(|v| v["reason"].as_str().unwrap()).collect();
    assert_eq!(opened, ["reopen", "reopen", "reopen", "start"]);
    assert!(all.iter().filter(|v| v["event"] == "log_opened").all(|v| v["signing_key"] == public.as_str()));
    assert!(
        all.iter().filter(|v| v["event"] == "checkpoint").count() >= 4,
        "every 4 records and at shutdown"
    );
    assert!(
        shipped.contains("audit checkpoint"),
        "checkpoints are copied to the proxy's own log:\n{shipped}"
    );
    let shipped_file = dir.path().join("shipped.txt");
    std::fs::write(&shipped_file, &shipped).unwrap();

    let files = |paths: &[&Path]| -> Vec<String> { paths.iter().map(|p| p.display().to_string()).collect() };
    let verify = |extra: Vec<String>| async move {
        let mut args = vec!["audit".to_string(), "verify".to_string()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tailgres(&args).await
    };
    let mut whole_args = vec![format!("--key={public}"), format!("--checkpoints={}", shipped_file.display())];
    // Any order.
    whole_args.extend(files(&[&log, &r2, &r1]));
    let (code, out, err) = verify(whole_args).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("whole: "), "{out}");
    assert!(out.lines().next().unwrap().starts_with(&r2.display().to_string()), "oldest first:\n{out}");

    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    let copy = |name: &str, edit: &dyn Fn(&mut Vec<String>)| -> PathBuf {
        let to = damaged.join(name);
        let mut l = lines(&r1);
        edit(&mut l);
        write_lines(&to, &l);
        to
    };
    let third_end = line_of(&r1, "third", "session_end");
    let third_auth = line_of(&r1, "third", "auth_ok");

    // One edited line: the third session's end, as if it had moved less data.
    let edited = copy("edited", &|l| {
        let original = &l[third_end - 1];
        let field = "\"bytes_upstream_to_client\":";
        let at = original.find(field).unwrap() + field.len();
        let end = at + original[at..].find(',').unwrap();
        l[third_end - 1] = format!("{}1{}", &original[..at], &original[end..]);
    });
    // One deleted line: the third session's auth_ok.
    let deleted = copy("deleted", &|l| {
        l.remove(third_auth - 1);
    });
    // One reordered pair.
    let reordered = copy("reordered", &|l| l.swap(third_auth - 1, third_auth));
    let cases: Vec<(Vec<String>, String)> = vec![
        (files(&[&r2, &edited, &log]), format!("{}:{third_end}: changed", edited.display())),
        (
            files(&[&r2, &deleted, &log]),
            format!("{}:{third_auth}: 1 record(s) missing before this line", deleted.display()),
        ),
        (
            files(&[&r2, &reordered, &log]),
            format!("{}:{third_auth}: 1 record(s) missing before this line", reordered.display()),
        ),
        (
            files(&[&r2, &log]),
            format!("a rotated file is missing between {} and {}", r2.display(), log.display()),
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = verify(args.clone()).await;
        assert_eq!(code, 1, "{args:?} passed:\n{out}{err}");
        let first = out.lines().find(|l| l.starts_with("BROKEN: ")).unwrap_or_default();
        assert!(first.starts_with(&format!("BROKEN: {want}")), "{args:?}: want {want:?}, got:\n{out}");
    }

    // The tail of the current log deleted, checkpoints and all: only the
    // shipped copies show it.
    let cut = damaged.join("cut");
    let mut l = lines(&log);
    let keep = l.iter().position(|x| x.contains("\"application_name\":\"fifth\"")).unwrap();
    l.truncate(keep);
    write_lines(&cut, &l);
    let (code, out, _) = verify(vec![
        format!("--key={public}"),
        r2.display().to_string(),
        r1.display().to_string(),
        cut.display().to_string(),
    ])
    .await;
    assert_eq!(code, 0, "without shipped checkpoints a deleted tail is invisible:\n{out}");
    let (code, out, _) = verify(vec![
        format!("--key={public}"),
        format!("--checkpoints={}", shipped_file.display()),
        r2.display().to_string(),
        r1.display().to_string(),
        cut.display().to_string(),
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("was shipped: records after"), "{out}");

    // Another key pinned: every checkpoint is refused.
    let other = dir.path().join("other.pem");
    let (_, other_public, _) = tailgres(&["audit", "keygen", other.to_str().unwrap()]).await;
    let (code, out, _) =
        verify(vec![format!("--key={}", other_public.trim()), log.display().to_string()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the signature does not verify"), "{out}");
}

/// A key file others can read is refused at start, naming the flag.
#[tokio::test]
async fn a_readable_signing_key_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let (code, _, err) = tailgres(&["audit", "keygen", key.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = tailgres(&["audit", "keygen", key.to_str().unwrap()]).await;
    assert_eq!(code, 2, "an existing key is never overwritten");
    assert!(err.contains("File exists"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = tailgres(&[
        "--upstream=127.0.0.1:1",
        "--audit-log=-",
        &format!("--audit-signing-key={}", key.display()),
        "--control-url=http://127.0.0.1:1",
        &format!("--state-dir={}", dir.path().display()),
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("--audit-signing-key") && err.contains("readable by group or others"), "{err}");
}
