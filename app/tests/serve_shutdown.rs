//! Graceful shutdown under load: SIGTERM while 4 clients write batches to
//! `tandem serve` (embedded stores). The service exits cleanly; every client
//! saw success, a not-applied error, or no answer (an unknown outcome) — and
//! retrying each unknown batch with its idempotency key against a restarted
//! service resolves it. Then `tandem recover` and `tandem verify` find both
//! stores exactly as the clients were told: every acknowledged batch, nothing
//! of the others.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Server, Stores};

const CONFIG: &str = "\
[coordinator]
lease_secs = 2
call_deadline_secs = 0.8
cleanup_deadline_secs = 0.3
";

const CLIENTS: usize = 4;
const PER_BATCH: u32 = 5;

/// What a client learned of one batch.
#[derive(Debug)]
enum Seen {
    /// 200: written (or replayed).
    Applied,
    /// An error whose outcome is `not_applied`, with its code.
    NotApplied(String),
    /// No answer, or an `unknown` outcome: only a retry can tell.
    Unknown(String),
}

fn batch(client: usize, n: u32) -> Value {
    let records: Vec<Value> = (0..PER_BATCH)
        .map(|j| {
            json!({
                "id": format!("00000000-0000-4000-8{client:03}-{:012}", n * PER_BATCH + j),
                "scope": format!("client-{client}"),
                "content": format!("client {client} batch {n} record {j}"),
                "vector": [1.0, n as f32 + 1.0, j as f32, client as f32 + 0.5],
            })
        })
        .collect();
    json!({ "records": records })
}

fn key(client: usize, n: u32) -> String {
    format!("client-{client}/batch-{n}")
}

/// Sends one batch; classifies the answer.
fn send(agent: &ureq::Agent, base: &str, client: usize, n: u32) -> Seen {
    let body = batch(client, n).to_string();
    let sent = agent
        .post(&format!("{base}/api/v1/records"))
        .header("content-type", "application/json")
        .header("idempotency-key", &key(client, n))
        .send(body.as_bytes());
    let mut response = match sent {
        Ok(r) => r,
        // The connection was refused, reset or closed: whether the request
        // got in is not known here.
        Err(e) => return Seen::Unknown(e.to_string()),
    };
    let status = response.status().as_u16();
    let text = match response.body_mut().read_to_string() {
        Ok(t) => t,
        Err(e) => return Seen::Unknown(format!("{status}, body lost: {e}")),
    };
    if status == 200 {
        return Seen::Applied;
    }
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}"));
    match v["outcome"].as_str() {
        Some("not_applied") => Seen::NotApplied(v["code"].as_str().unwrap_or_default().to_owned()),
        Some("unknown") => Seen::Unknown(v["code"].as_str().unwrap_or_default().to_owned()),
        _ => panic!("an error without an outcome: {status} {text}"),
    }
}

#[test]
fn sigterm_under_load_loses_nothing_acknowledged_and_applies_nothing_refused() {
    let stores = Stores::embedded();
    let config = stores.config(CONFIG);
    let global = ["--config", config.to_str().unwrap()];
    let s = Server::start(&stores, &global, &[]);
    let base = s.base.clone();
    let applied = AtomicUsize::new(0);

    let seen: Vec<BTreeMap<u32, Seen>> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (base, applied) = (&base, &applied);
                scope.spawn(move || {
                    let agent = support::agent(Duration::from_secs(60));
                    let mut seen = BTreeMap::new();
                    // Until the service is gone (bounded, in case it never goes).
                    for n in 0..2_000 {
                        let outcome = send(&agent, base, client, n);
                        let done = matches!(outcome, Seen::Unknown(_));
                        if matches!(outcome, Seen::Applied) {
                            applied.fetch_add(1, Ordering::SeqCst);
                        }
                        seen.insert(n, outcome);
                        if done {
                            break;
                        }
                    }
                    seen
                })
            })
            .collect();
        // Every client is writing: stop the service under their load.
        while applied.load(Ordering::SeqCst) < 4 * CLIENTS {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, stderr) = s.terminate();
        assert_eq!(code, 0, "a clean exit:\n{stderr}");
        assert!(stderr.contains("shutting down"), "{stderr}");
        clients
            .into_iter()
            .map(|c| c.join().expect("a client"))
            .collect()
    });

    // Whatever a client saw is one of the three; retry the unknown ones.
    let restarted = Server::start(&stores, &global, &[]);
    let agent = support::agent(Duration::from_secs(60));
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let (mut acknowledged, mut refused, mut resolved) = (0, 0, 0);
    for (client, batches) in seen.iter().enumerate() {
        let scope = format!("client-{client}");
        for (&n, outcome) in batches {
            match outcome {
                Seen::Applied => acknowledged += 1,
                Seen::NotApplied(code) => {
                    assert!(
                        ["shutting_down", "deadline_exceeded"].contains(&code.as_str()),
                        "client {client} batch {n}: {code}"
                    );
                    refused += 1;
                    continue;
                }
                Seen::Unknown(why) => match send(&agent, &restarted.base, client, n) {
                    Seen::Applied => resolved += 1,
                    other => panic!(
                        "client {client} batch {n} ({why}): the retry with its key did not \
                         resolve it: {other:?}"
                    ),
                },
            }
            *expected.entry(scope.clone()).or_default() += u64::from(PER_BATCH);
        }
    }
    eprintln!(
        "{acknowledged} batches acknowledged, {refused} refused (not applied), {resolved} \
         unknown and resolved by a retry with their key"
    );
    assert!(acknowledged >= 4 * CLIENTS);
    drop(restarted);

    // Recovery finishes whatever an abandoned call left (after its lease),
    // and both stores hold exactly what the clients were told.
    let mut pending = u64::MAX;
    for _ in 0..30 {
        let (code, out, err) = stores.cli(&global, &["--json", "recover"]);
        assert_eq!(code, 0, "recover: {out}\n{err}");
        let v: Value = serde_json::from_str(&out).expect("JSON");
        pending = v["pending_intents"].as_u64().unwrap();
        if pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(pending, 0, "intents left after recovery");
    let (code, out, err) = stores.cli(&global, &["--json", "verify"]);
    assert_eq!(code, 0, "verify: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["consistent"], true, "{v:#}");
    let rows: BTreeMap<String, u64> = v["scopes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(scope, c)| {
            assert_eq!(c["rows"], c["points"], "{scope}");
            (scope.clone(), c["rows"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        rows, expected,
        "the stores hold exactly the acknowledged batches"
    );
}

#[test]
fn writes_in_flight_at_sigterm_finish_before_the_service_exits() {
    use tandem_tests::qdrant_double::{RpcAction, RpcFault};
    let stores = Stores::servers();
    let s = Server::start(&stores, &[], &[]);
    // Every index write takes two seconds: the calls are surely in flight.
    stores.double().faults().add(RpcFault::always(
        "Upsert",
        RpcAction::Delay(Duration::from_secs(2)),
    ));
    let base = s.base.clone();
    let outcomes: Vec<Seen> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let base = &base;
                scope.spawn(move || send(&support::agent(Duration::from_secs(60)), base, client, 0))
            })
            .collect();
        s.wait_for_status(Duration::from_secs(30), "four writes in flight", |st| {
            st["http"]["writes_in_flight"].as_u64() == Some(CLIENTS as u64)
        });
        let (code, stderr) = s.terminate();
        assert_eq!(code, 0, "a clean exit:\n{stderr}");
        clients
            .into_iter()
            .map(|c| c.join().expect("a client"))
            .collect()
    });
    for (client, o) in outcomes.iter().enumerate() {
        assert!(matches!(o, Seen::Applied), "client {client}: {o:?}");
    }
    stores.double().faults().clear();
    let (code, out, err) = stores.cli(&["--json"], &["verify"]);
    assert_eq!(code, 0, "verify: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let rows: u64 = v["scopes"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, CLIENTS as u64 * u64::from(PER_BATCH), "{v:#}");
}

#[test]
fn writes_still_running_when_the_grace_ends_are_abandoned_safely() {
    use tandem_tests::qdrant_double::{RpcAction, RpcFault};
    let stores = Stores::servers();
    let config = stores.config(
        "[coordinator]\nlease_secs = 4\ncall_deadline_secs = 2.5\ncleanup_deadline_secs = 0.5\n",
    );
    let global = ["--config", config.to_str().unwrap()];
    let s = Server::start(&stores, &global, &["--shutdown-grace", "200ms"]);
    // Index writes take 2 s: at SIGTERM every write is mid-protocol, and the
    // grace ends long before they do.
    let faults = stores.double().faults().clone();
    faults.add(RpcFault::always(
        "Upsert",
        RpcAction::Delay(Duration::from_secs(2)),
    ));
    let base = s.base.clone();
    let outcomes: Vec<Seen> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let base = &base;
                scope.spawn(move || send(&support::agent(Duration::from_secs(60)), base, client, 0))
            })
            .collect();
        s.wait_for_status(Duration::from_secs(30), "four writes in flight", |st| {
            st["http"]["writes_in_flight"].as_u64() == Some(CLIENTS as u64)
        });
        let (code, stderr) = s.terminate();
        assert_eq!(code, 0, "a clean exit:\n{stderr}");
        assert!(
            stderr.contains("abandoning") || stderr.contains("still running"),
            "{stderr}"
        );
        clients
            .into_iter()
            .map(|c| c.join().expect("a client"))
            .collect()
    });
    faults.clear();
    // No client was told its write happened; each retries with its key.
    let restarted = Server::start(&stores, &global, &["--recover-every", "500ms"]);
    let agent = support::agent(Duration::from_secs(60));
    for (client, o) in outcomes.iter().enumerate() {
        assert!(matches!(o, Seen::Unknown(_)), "client {client}: {o:?}");
        assert!(
            matches!(send(&agent, &restarted.base, client, 0), Seen::Applied),
            "client {client}: the retry with its key resolves the unknown outcome"
        );
    }
    // The abandoned calls' intents are finished by the restarted service's
    // recovery once their lease ends; both stores then agree exactly.
    restarted.wait_for_status(
        Duration::from_secs(60),
        "the abandoned intents recovered",
        |st| {
            st["backlog"]["live_intents"] == 0
                && support::browser::total(st, "recovered_intents") >= 1
        },
    );
    drop(restarted);
    let (code, out, err) = stores.cli(&global, &["--json", "verify"]);
    assert_eq!(code, 0, "verify: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let rows: u64 = v["scopes"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, CLIENTS as u64 * u64::from(PER_BATCH), "{v:#}");
}
