//! Counters, gauges and histograms for `/metrics`, rendered in the
//! Prometheus text exposition format (version 0.0.4). Plain atomics and
//! small maps: a session touches a handful of them once per stage.
#![forbid(unsafe_code)]

use crate::audit::{DenyReason, EndReason};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Upper bounds (seconds) of the latency buckets: 1 ms to 10 s.
const BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A timed step of the session pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Tailscale WhoIs of the peer.
    Whois,
    /// Dial the database, SSLRequest, TLS handshake: the whole connect.
    UpstreamConnect,
    /// The TLS handshake alone (part of UpstreamConnect).
    UpstreamTls,
    /// Authentication, from the first upstream byte to ReadyForQuery.
    Auth,
    /// Signing an identity-login certificate (key generation, signature).
    IdentityCertificate,
    /// Looking a role's verifier up (`--auth scram-verifier`, cache misses).
    VerifierLookup,
}

impl Stage {
    const ALL: [Stage; 6] = [
        Stage::Whois,
        Stage::UpstreamConnect,
        Stage::UpstreamTls,
        Stage::Auth,
        Stage::IdentityCertificate,
        Stage::VerifierLookup,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Whois => "whois",
            Stage::UpstreamConnect => "upstream_connect",
            Stage::UpstreamTls => "upstream_tls",
            Stage::Auth => "auth",
            Stage::IdentityCertificate => "identity_certificate",
            Stage::VerifierLookup => "verifier_lookup",
        }
    }
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// What `/metrics` reports about the tailnet node (asked at scrape time).
pub struct TailnetGauge<'a> {
    pub backend_state: &'a str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    sessions_active: AtomicI64,
    /// (event, reason) → sessions.
    outcomes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    stages: [Histogram; Stage::ALL.len()],
    audit_write: Histogram,
    bytes_c2u: AtomicU64,
    bytes_u2c: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Route name → the certificate its database last presented expires at.
    upstream_cert: Mutex<BTreeMap<String, SystemTime>>,
    /// Per identity-login route, its CA's notAfter (replaced whole when
    /// the settings are).
    identity_ca: Mutex<BTreeMap<String, SystemTime>>,
    client_cert: Mutex<Option<SystemTime>>,
    reloads: Mutex<BTreeMap<&'static str, u64>>,
}

/// Keeps `sessions_active` up while a session runs (drop guard).
pub struct ActiveSession<'a>(&'a Metrics);

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    *m.lock().unwrap_or_else(|e| e.into_inner()).entry(k).or_default() += 1;
}

impl Metrics {
    pub fn session_started(&self) -> ActiveSession<'_> {
        self.sessions_active.fetch_add(1, Ordering::Relaxed);
        ActiveSession(self)
    }

    pub fn denied(&self, reason: DenyReason) {
        bump(&self.outcomes, ("session_denied", reason.as_str()));
        if let Some(kind) = error_kind(reason) {
            bump(&self.errors, kind);
        }
    }

    pub fn ended(&self, reason: EndReason, c2u: u64, u2c: u64) {
        bump(&self.outcomes, ("session_end", reason.as_str()));
        self.bytes_c2u.fetch_add(c2u, Ordering::Relaxed);
        self.bytes_u2c.fetch_add(u2c, Ordering::Relaxed);
        match reason {
            EndReason::ClientError => bump(&self.errors, "client_io"),
            EndReason::UpstreamError => bump(&self.errors, "upstream_io"),
            _ => {}
        }
    }

    pub fn stage(&self, stage: Stage, d: Duration) {
        self.stages[stage as usize].observe(d);
    }

    pub fn audit_write(&self, d: Duration) {
        self.audit_write.observe(d);
    }

    /// Errors that are not a session outcome: `audit_write`, `accept`,
    /// `cancel_forward`.
    pub fn error(&self, kind: &'static str) {
        bump(&self.errors, kind);
    }

    pub fn upstream_cert(&self, route: &str, not_after: Option<SystemTime>) {
        if let Some(t) = not_after {
            self.upstream_cert.lock().unwrap_or_else(|e| e.into_inner()).insert(route.to_string(), t);
        }
    }

    /// The identity CAs of the settings in force: (route, CA notAfter).
    pub fn identity_cas(&self, cas: impl IntoIterator<Item = (String, SystemTime)>) {
        *self.identity_ca.lock().unwrap_or_else(|e| e.into_inner()) = cas.into_iter().collect();
    }

    pub fn client_cert(&self, not_after: Option<SystemTime>) {
        *self.client_cert.lock().unwrap_or_else(|e| e.into_inner()) = not_after;
    }

    pub fn reload(&self, ok: bool) {
        bump(&self.reloads, if ok { "ok" } else { "failed" });
    }

    /// The whole exposition.
    pub fn render(&self, tailnet: &TailnetGauge<'_>) -> String {
        let mut o = String::with_capacity(8 * 1024);
        header(&mut o, "tailgres_info", "gauge", "Build information.");
        let _ = writeln!(o, "tailgres_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

        header(&mut o, "tailgres_sessions_active", "gauge", "Sessions being served now.");
        let _ = writeln!(o, "tailgres_sessions_active {}", self.sessions_active.load(Ordering::Relaxed));

        header(
            &mut o,
            "tailgres_sessions_total",
            "counter",
            "Sessions by outcome: event session_end or session_denied, and the audit reason.",
        );
        for ((event, reason), n) in self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "tailgres_sessions_total{{event=\"{event}\",reason=\"{reason}\"}} {n}");
        }

        header(&mut o, "tailgres_stage_duration_seconds", "histogram", "Latency of each pipeline stage.");
        for s in Stage::ALL {
            self.stages[s as usize].render(
                &mut o,
                "tailgres_stage_duration_seconds",
                &format!("stage=\"{}\"", s.name()),
            );
        }

        header(
            &mut o,
            "tailgres_relayed_bytes_total",
            "counter",
            "Bytes relayed, by direction (ended sessions).",
        );
        let _ = writeln!(
            o,
            "tailgres_relayed_bytes_total{{direction=\"client_to_upstream\"}} {}",
            self.bytes_c2u.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "tailgres_relayed_bytes_total{{direction=\"upstream_to_client\"}} {}",
            self.bytes_u2c.load(Ordering::Relaxed)
        );

        header(&mut o, "tailgres_errors_total", "counter", "Errors by kind.");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "tailgres_errors_total{{kind=\"{kind}\"}} {n}");
        }

        header(
            &mut o,
            "tailgres_audit_write_duration_seconds",
            "histogram",
            "Time to write one audit record.",
        );
        self.audit_write.render(&mut o, "tailgres_audit_write_duration_seconds", "");

        let now = SystemTime::now();
        let left = |t: &SystemTime| match t.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        header(
            &mut o,
            "tailgres_upstream_cert_expiry_seconds",
            "gauge",
            "Seconds until the certificate each route's database last presented expires (negative: expired).",
        );
        for (route, t) in self.upstream_cert.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                o,
                "tailgres_upstream_cert_expiry_seconds{{route=\"{}\"}} {}",
                escape(route),
                left(t)
            );
        }
        header(
            &mut o,
            "tailgres_identity_ca_expiry_seconds",
            "gauge",
            "Seconds until each identity-login route's CA expires (identity login stops then).",
        );
        for (route, t) in self.identity_ca.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ =
                writeln!(o, "tailgres_identity_ca_expiry_seconds{{route=\"{}\"}} {}", escape(route), left(t));
        }
        header(
            &mut o,
            "tailgres_client_cert_expiry_seconds",
            "gauge",
            "Seconds until the certificate tailgres offers TLS clients expires.",
        );
        if let Some(t) = *self.client_cert.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = writeln!(o, "tailgres_client_cert_expiry_seconds {}", left(&t));
        }

        header(&mut o, "tailgres_reloads_total", "counter", "SIGHUP reloads by result.");
        for (result, n) in self.reloads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "tailgres_reloads_total{{result=\"{result}\"}} {n}");
        }

        header(
            &mut o,
            "tailgres_tailnet_backend_state",
            "gauge",
            "The embedded Tailscale node's backend state (1 for the current one).",
        );
        let _ =
            writeln!(o, "tailgres_tailnet_backend_state{{state=\"{}\"}} 1", escape(tailnet.backend_state));
        o
    }
}

/// The error kind a refusal counts under; `None` for refusals by policy,
/// hang-ups and shutdown, which are outcomes, not errors.
fn error_kind(r: DenyReason) -> Option<&'static str> {
    use DenyReason::*;
    Some(match r {
        NotAuthorized | NoRoute | ClientClosed | ShuttingDown | PasswordFailed => return None,
        // The failed writes behind it are counted where they fail.
        AuditUnavailable => return None,
        UnknownPeer | WhoisFailed => "whois",
        ProtocolError | HandshakeTimeout => "client_protocol",
        ClientTlsFailed => "client_tls",
        TooManySessions | TooManyHandshakes => "session_limit",
        UpstreamUntrustedCertificate | UpstreamNameMismatch | UpstreamCertificateExpired | UpstreamTls => {
            "upstream_tls"
        }
        UpstreamNoTls | UpstreamProtocolError => "upstream_protocol",
        UpstreamUnreachable | UpstreamTimeout => "upstream_connect",
        IdentityCertificateFailed => "identity_certificate",
        VerifierLookupFailed => "verifier_lookup",
        ServiceConnectionRefused => "service_connection",
    })
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// Label values: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_move_and_render() {
        let m = Metrics::default();
        let active = m.session_started();
        m.stage(Stage::Whois, Duration::from_micros(300));
        m.stage(Stage::Whois, Duration::from_millis(30));
        m.denied(DenyReason::UpstreamNameMismatch);
        m.ended(EndReason::ClientTerminated, 10, 20);
        m.ended(EndReason::ClientTerminated, 1, 2);
        m.upstream_cert("a\"b", Some(SystemTime::now() + Duration::from_secs(3600)));
        m.identity_cas([("people".to_string(), SystemTime::now() + Duration::from_secs(7200))]);
        let t = m.render(&TailnetGauge { backend_state: "Running" });
        assert_eq!(value(&t, "tailgres_sessions_active"), Some(1.0));
        drop(active);
        let t2 = m.render(&TailnetGauge { backend_state: "Running" });
        assert_eq!(value(&t2, "tailgres_sessions_active"), Some(0.0));
        assert_eq!(
            value(&t, "tailgres_sessions_total{event=\"session_end\",reason=\"client_terminated\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&t, "tailgres_sessions_total{event=\"session_denied\",reason=\"upstream_name_mismatch\"}"),
            Some(1.0)
        );
        assert_eq!(value(&t, "tailgres_errors_total{kind=\"upstream_tls\"}"), Some(1.0));
        assert_eq!(value(&t, "tailgres_relayed_bytes_total{direction=\"upstream_to_client\"}"), Some(22.0));
        assert_eq!(
            value(&t, "tailgres_stage_duration_seconds_bucket{stage=\"whois\",le=\"0.001\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "tailgres_stage_duration_seconds_bucket{stage=\"whois\",le=\"0.05\"}"),
            Some(2.0)
        );
        assert_eq!(value(&t, "tailgres_stage_duration_seconds_count{stage=\"whois\"}"), Some(2.0));
        let left = value(&t, "tailgres_upstream_cert_expiry_seconds{route=\"a\\\"b\"}").unwrap();
        let ca = value(&t, "tailgres_identity_ca_expiry_seconds{route=\"people\"}").unwrap();
        assert!((7100.0..=7200.0).contains(&ca), "{ca}");
        assert!((3500.0..=3600.0).contains(&left), "{left}");
        assert_eq!(value(&t, "tailgres_tailnet_backend_state{state=\"Running\"}"), Some(1.0));
        // Every sample line is NAME{labels} VALUE or NAME VALUE.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap_or_else(|_| panic!("{l}"));
        }
    }
}
