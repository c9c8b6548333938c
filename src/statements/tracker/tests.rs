//! The tracker against message sequences as clients and PostgreSQL send
//! them, fed whole and byte by byte.

use super::*;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    crate::pgwire::message_bytes(kind, body)
}

fn cs(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cs(sql))
}
fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', &[cs(name), cs(sql), vec![0, 0]].concat())
}
fn bind(portal: &str, statement: &str) -> Vec<u8> {
    msg(b'B', &[cs(portal), cs(statement), vec![0, 0, 0, 0, 0, 0]].concat())
}
fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
    msg(b'E', &[cs(portal), max_rows.to_be_bytes().to_vec()].concat())
}
fn sync() -> Vec<u8> {
    msg(b'S', b"")
}
fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cs(tag))
}
fn error(code: &str) -> Vec<u8> {
    msg(b'E', &[b"SERROR\0VERROR\0C".to_vec(), cs(code), b"Mdivision by zero\0\0".to_vec()].concat())
}
fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}
fn row() -> Vec<u8> {
    msg(b'D', &[0, 1, 0, 0, 0, 1, b'1'])
}

/// Feeds (client?, bytes) in order, whole or one byte at a time, and
/// returns what ran (times dropped).
fn run(steps: &[(bool, Vec<u8>)], bytewise: bool, now: Instant) -> (Vec<Ran>, Tracker) {
    let mut t = Tracker::default();
    let mut ran = Vec::new();
    for (client, bytes) in steps {
        if bytewise {
            for b in bytes {
                t.feed(*client, std::slice::from_ref(b), now, &mut ran);
            }
        } else {
            t.feed(*client, bytes, now, &mut ran);
        }
    }
    (ran, t)
}

fn both(steps: &[(bool, Vec<u8>)]) -> Vec<Ran> {
    let now = Instant::now();
    let (whole, _) = run(steps, false, now);
    let (bytewise, _) = run(steps, true, now);
    assert_eq!(whole, bytewise, "fed whole and byte by byte");
    whole
}

fn sql(text: &Text) -> &str {
    match text {
        Text::Sql(s) => s,
        other => panic!("no text: {other:?}"),
    }
}

/// (text, outcome) of each Execute (anything else fails the test).
fn executes(ran: &[Ran]) -> Vec<(&str, Outcome)> {
    ran.iter()
        .map(|r| match r {
            Ran::Execute { text, result, .. } => (sql(text), result.outcome.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn outcomes(results: &[Result]) -> Vec<Outcome> {
    results.iter().map(|r| r.outcome.clone()).collect()
}

const C: bool = true;
const S: bool = false;

#[test]
fn a_simple_query_with_two_statements() {
    let ran = both(&[
        (C, query("select 1; select 2")),
        (S, [row(), complete("SELECT 1"), row(), complete("SELECT 1"), ready()].concat()),
    ]);
    let [Ran::Query { text, results, .. }] = ran.as_slice() else { panic!("{ran:?}") };
    assert_eq!(sql(text), "select 1; select 2");
    assert_eq!(
        outcomes(results),
        [Outcome::Complete("SELECT 1".into()), Outcome::Complete("SELECT 1".into())]
    );
}

#[test]
fn an_error_ends_a_simple_query_with_its_sqlstate() {
    let ran = both(&[(C, query("select 1/0; select 2")), (S, [error("22012"), ready()].concat())]);
    let [Ran::Query { results, .. }] = ran.as_slice() else { panic!("{ran:?}") };
    assert_eq!(outcomes(results), [Outcome::Error(Some("22012".into()))]);
}

#[test]
fn extended_protocol_named_unnamed_and_pipelined() {
    let ran = both(&[
        (C, [parse("s1", "insert into t values ($1)"), bind("p1", "s1"), execute("p1", 0)].concat()),
        (
            C,
            [parse("", "select $1::int"), bind("", ""), execute("", 0), bind("", "s1"), execute("", 0)]
                .concat(),
        ),
        (C, sync()),
        (S, msg(b'1', b"")),
        (S, [msg(b'2', b""), complete("INSERT 0 1"), msg(b'1', b""), msg(b'2', b""), row()].concat()),
        (S, [complete("SELECT 1"), msg(b'2', b""), complete("INSERT 0 1"), ready()].concat()),
    ]);
    let got = executes(&ran);
    assert_eq!(
        got,
        [
            ("insert into t values ($1)", Outcome::Complete("INSERT 0 1".into())),
            ("select $1::int", Outcome::Complete("SELECT 1".into())),
            ("insert into t values ($1)", Outcome::Complete("INSERT 0 1".into())),
        ]
    );
}

#[test]
fn after_an_error_the_executes_before_sync_never_ran() {
    let ran = both(&[
        (
            C,
            [parse("", "select 1/0"), bind("", ""), execute("", 0), parse("", "select 2"), bind("", "")]
                .concat(),
        ),
        (C, [execute("", 0), sync(), parse("", "select 3"), bind("", ""), execute("", 0), sync()].concat()),
        (S, [msg(b'1', b""), msg(b'2', b""), error("22012"), ready()].concat()),
        (S, [msg(b'1', b""), msg(b'2', b""), row(), complete("SELECT 1"), ready()].concat()),
    ]);
    let got = executes(&ran);
    assert_eq!(
        got,
        [
            ("select 1/0", Outcome::Error(Some("22012".into()))),
            ("select 3", Outcome::Complete("SELECT 1".into()))
        ]
    );
}

#[test]
fn copy_in_and_out_count_their_bytes() {
    let ran = both(&[
        (C, query("copy t from stdin")),
        (S, msg(b'G', &[0, 0, 1, 0, 0])),
        (C, [msg(b'd', b"1\tone\n"), msg(b'd', b"2\ttwo\n"), msg(b'c', b"")].concat()),
        (S, [complete("COPY 2"), ready()].concat()),
        (C, query("copy t to stdout")),
        (S, [msg(b'H', &[0, 0, 1, 0, 0]), msg(b'd', b"1\tone\n"), msg(b'c', b"")].concat()),
        (S, [complete("COPY 1"), ready()].concat()),
    ]);
    let copies: Vec<Option<Copy>> = ran
        .iter()
        .map(|r| match r {
            Ran::Query { results, .. } => results[0].copy,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        copies,
        [
            Some(Copy { direction: CopyDirection::In, bytes: 12 }),
            Some(Copy { direction: CopyDirection::Out, bytes: 6 })
        ]
    );
}

#[test]
fn a_suspended_portal_and_a_closed_statement() {
    let ran = both(&[
        (C, [parse("s", "select g from generate_series(1, 3) g"), bind("p", "s"), execute("p", 2)].concat()),
        (
            C,
            [msg(b'C', &[b"S".to_vec(), cs("s")].concat()), bind("q", "s"), execute("q", 0), sync()].concat(),
        ),
        (S, [msg(b'1', b""), msg(b'2', b""), row(), row(), msg(b's', b""), msg(b'3', b"")].concat()),
        (S, [msg(b'2', b""), complete("SELECT 3"), ready()].concat()),
    ]);
    let [Ran::Execute { text: first, result: r1, .. }, Ran::Execute { text: second, result: r2, .. }] =
        ran.as_slice()
    else {
        panic!("{ran:?}")
    };
    assert_eq!((sql(first), &r1.outcome), ("select g from generate_series(1, 3) g", &Outcome::Suspended));
    // The statement was closed before that Bind named it: the text is gone.
    assert_eq!((second, &r2.outcome), (&Text::Unknown, &Outcome::Complete("SELECT 3".into())));
}

#[test]
fn a_text_too_long_to_keep_is_digested() {
    use sha2::Digest;
    let long = "select '".to_string() + &"x".repeat(MAX_TEXT) + "'";
    let ran = both(&[(C, query(&long)), (S, [complete("SELECT 1"), ready()].concat())]);
    let [Ran::Query { text, .. }] = ran.as_slice() else { panic!("{ran:?}") };
    let want: [u8; 32] = sha2::Sha256::digest(cs(&long)).into();
    assert_eq!(text, &Text::TooLong { sha256: want, len: long.len() + 1 });
}

#[test]
fn a_pipeline_past_the_bound_gives_up() {
    let mut t = Tracker::default();
    let mut ran = Vec::new();
    let one = sync();
    for _ in 0..MAX_PENDING {
        t.feed(true, &one, Instant::now(), &mut ran);
    }
    assert_eq!(t.lost(), None);
    t.feed(true, &one, Instant::now(), &mut ran);
    assert_eq!(t.lost(), Some(&Lost::Pipeline));
}

#[test]
fn answers_without_questions_and_garbage_are_ignored() {
    let ran = both(&[
        (S, [complete("SELECT 1"), error("XX000"), ready(), msg(b'E', b"\xff\xff")].concat()),
        (C, msg(b'B', b"no terminator")),
        (C, execute("never bound", 0)),
        (S, [complete("SELECT 0"), ready()].concat()),
    ]);
    let [Ran::Execute { text: Text::Unknown, result, .. }] = ran.as_slice() else { panic!("{ran:?}") };
    assert_eq!(result.outcome, Outcome::Complete("SELECT 0".into()));
}

#[test]
fn bind_values_are_kept_only_when_asked_for() {
    let bind_with = |values: &[Option<&[u8]>], formats: &[u16]| {
        let mut body = [cs(""), cs("s")].concat();
        body.extend((formats.len() as u16).to_be_bytes());
        for f in formats {
            body.extend(f.to_be_bytes());
        }
        body.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    body.extend((v.len() as i32).to_be_bytes());
                    body.extend(*v);
                }
                None => body.extend((-1i32).to_be_bytes()),
            }
        }
        body.extend([0, 0]);
        msg(b'B', &body)
    };
    let steps = [
        (
            C,
            [
                parse("s", "select $1, $2, $3"),
                bind_with(&[Some(b"alice"), None, Some(&[0, 0, 0, 7])], &[0, 0, 1]),
            ]
            .concat(),
        ),
        (C, [execute("", 0), sync()].concat()),
        (S, [msg(b'1', b""), msg(b'2', b""), row(), complete("SELECT 1"), ready()].concat()),
    ];
    let (ran, _) = run(&steps, false, Instant::now());
    let [Ran::Execute { params: None, .. }] = ran.as_slice() else { panic!("kept by default: {ran:?}") };
    let mut t = Tracker::with_params();
    let mut ran = Vec::new();
    for (client, bytes) in &steps {
        t.feed(*client, bytes, Instant::now(), &mut ran);
    }
    let [Ran::Execute { params: Some(p), .. }] = ran.as_slice() else { panic!("{ran:?}") };
    assert_eq!(&p[..], [Param::Text("alice".into()), Param::Null, Param::Binary(vec![0, 0, 0, 7])]);
    // One format code applies to every value; a Bind that does not hold
    // together keeps none.
    assert_eq!(bind_values(&[0, 1, 0, 1, 0, 1, 0, 0, 0, 1, b'x']), Some(vec![Param::Binary(vec![b'x'])]));
    assert_eq!(bind_values(&[0, 0, 0, 2, 0, 0, 0, 9, b'x']), None);
}

#[test]
fn a_client_cannot_make_the_tracker_hold_unbounded_text() {
    let mut t = Tracker::default();
    let mut ran = Vec::new();
    let text = format!("select '{}'", "x".repeat(100_000));
    // Forty prepared statements of 100 kB: more than the budget.
    for i in 0..40 {
        t.feed(true, &parse(&format!("s{i}"), &text), Instant::now(), &mut ran);
    }
    assert!(t.prepared.kept <= TEXT_BUDGET, "{}", t.prepared.kept);
    assert!(t.prepared.map.contains_key(&b"s39"[..]), "the newest is kept");
    assert!(!t.prepared.map.contains_key(&b"s0"[..]), "the oldest went");
    // Queries waiting for answers: past the budget, kept as digests.
    for _ in 0..40 {
        t.feed(true, &query(&text), Instant::now(), &mut ran);
    }
    assert!(t.queued <= TEXT_BUDGET, "{}", t.queued);
    let answers: Vec<u8> = (0..40).flat_map(|_| [complete("SELECT 1"), ready()].concat()).collect();
    t.feed(false, &answers, Instant::now(), &mut ran);
    assert_eq!(ran.len(), 40);
    assert!(matches!(&ran[0], Ran::Query { text: Text::Sql(_), .. }));
    assert!(matches!(&ran[39], Ran::Query { text: Text::TooLong { len: 100_009, .. }, .. }), "{:?}", ran[39]);
    assert_eq!(t.queued, 0, "answered: nothing held");
}
