//! Background recovery: a `tandem ingest` writing to the same stores as a
//! running `tandem serve` (PostgreSQL + the Qdrant test server) is killed with
//! SIGKILL while its batch's index write hangs; the service resolves the
//! intents it left within two recovery runs after their lease ended, and its
//! status, its dashboard and `/metrics` show it. Afterwards `tandem verify` is
//! exact.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use support::browser::{check_page, chromium, total};
use support::{Server, Stores, metric_value, tandem};
use tandem_tests::qdrant_double::{RpcAction, RpcFault};

/// Short leases, so that recovery may take a dead writer's intents over soon.
const CONFIG: &str = "\
[coordinator]
lease_secs = 1.5
call_deadline_secs = 0.6
cleanup_deadline_secs = 0.3
";

/// How often the service runs recovery.
const RECOVER_EVERY_MS: i64 = 500;

#[test]
fn the_service_recovers_the_intents_of_a_killed_writer_within_two_runs() {
    chromium();
    let stores = Stores::servers();
    let config = stores.config(CONFIG);
    let config = config.to_str().unwrap();
    let s = Server::start(
        &stores,
        &["--config", config],
        &[
            "--recover-every",
            &format!("{RECOVER_EVERY_MS}ms"),
            "--verify-every",
            "200ms",
        ],
    );

    // Three batches land; from the fourth on, every index write hangs.
    let faults = stores.double().faults().clone();
    faults.add(RpcFault::always("Upsert", RpcAction::Hang).after(3));
    let input = stores.dir().join("input.jsonl");
    let mut f = std::fs::File::create(&input).expect("the input");
    for n in 0..100u32 {
        let line = json!({
            "id": support::id(n),
            "scope": format!("scope-{}", n % 2),
            "content": format!("record {n}"),
            "vector": [1.0, n as f32 + 1.0, 0.5, 0.25],
        });
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let mut writer = tandem(stores.dir())
        .args(stores.args())
        .args(["--config", config, "-q", "ingest"])
        .arg(&input)
        .args(["--batch-size", "10", "--idempotency-prefix", "killed"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tandem ingest starts");

    // Kill it while it has an intent in flight (the service's probe sees it).
    let at_kill = s.wait_for_status(
        Duration::from_secs(60),
        "the writer's intent in flight",
        |st| st["backlog"]["live_intents"].as_u64() >= Some(1),
    );
    let recovered_before = total(&at_kill, "recovered_intents");
    kill9(&mut writer);
    faults.clear();

    // What it left behind, and when each lease ends.
    let left: Vec<(String, i64)> = stores.block_on(async {
        let Stores::Servers { schema, .. } = &stores else {
            unreachable!()
        };
        schema
            .admin()
            .await
            .query("SELECT id::text, lease_deadline_ms FROM intents", &[])
            .await
            .expect("the intents")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    assert!(!left.is_empty(), "the killed writer left no intent");
    let last_deadline = left.iter().map(|(_, d)| *d).max().unwrap();

    // The service resolves them on its own.
    let st = s.wait_for_status(Duration::from_secs(60), "the intents recovered", |st| {
        st["backlog"]["live_intents"] == 0
            && total(st, "recovered_intents") >= recovered_before + left.len() as u64
    });
    // Within two runs of the lease's end: the runs after the last deadline
    // that resolved something are the first or the second of them.
    let runs: Vec<&Value> = st["recovery"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["started_at_ms"].as_i64().unwrap() > last_deadline)
        .collect();
    let resolved_in: Vec<usize> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r["report"]["resolved"].as_u64() > Some(0))
        .map(|(i, _)| i)
        .collect();
    let resolved_after: u64 = runs
        .iter()
        .map(|r| r["report"]["resolved"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "{} intents left by the killed writer; runs after the last lease ended resolved {:?} (run {resolved_in:?} of {})",
        left.len(),
        runs.iter()
            .map(|r| r["report"]["resolved"].clone())
            .collect::<Vec<_>>(),
        runs.len()
    );
    assert!(
        resolved_after >= 1 && resolved_in.iter().all(|&i| i < 2),
        "recovery runs after the last lease ended ({last_deadline}): {runs:#?}"
    );
    // Runs before the deadline resolved what had expired earlier; together
    // every intent the writer left is gone.
    assert!(
        st["recovery"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["failed"] == false),
        "{:#}",
        st["recovery"]
    );
    for pair in runs.windows(2) {
        let gap =
            pair[1]["started_at_ms"].as_i64().unwrap() - pair[0]["started_at_ms"].as_i64().unwrap();
        assert!(
            gap >= RECOVER_EVERY_MS - 50,
            "runs are spaced by the interval: {gap} ms"
        );
    }

    // /metrics says so too.
    let m = s.get("/metrics").body;
    let recovered = metric_value(&m, "tandem_recovered_intents_total").expect("exported");
    assert!(
        recovered >= left.len() as f64,
        "{recovered} < {}",
        left.len()
    );
    assert_eq!(metric_value(&m, "tandem_pending_intents"), Some(0.0));
    assert!(metric_value(&m, "tandem_background_runs_total{task=\"recover\"}") >= Some(2.0));

    // And the dashboard: the page's numbers are its snapshot's, and that
    // snapshot counts the recovered intents.
    let profile = tempfile::tempdir().expect("a profile");
    let (_, shown) = check_page(&s, profile.path());
    assert!(total(&shown, "recovered_intents") >= recovered_before + left.len() as u64);
    assert_eq!(shown["backlog"]["live_intents"], 0);

    // Both stores agree exactly: the three batches that committed, nothing else.
    drop(s);
    let (code, out, err) = stores.cli(&["--config", config, "--json"], &["verify"]);
    assert_eq!(code, 0, "verify: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["consistent"], true);
    let rows: u64 = v["scopes"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["rows"].as_u64().unwrap())
        .sum();
    let points: u64 = v["scopes"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["points"].as_u64().unwrap())
        .sum();
    assert_eq!((rows, points), (30, 30), "{v:#}");
}

#[test]
fn with_repair_the_service_repairs_what_its_verification_finds() {
    use tandem_core::{Distance, Point, PointId, RecordId, Scope, VectorIndex};
    let stores = Stores::servers();
    let config = stores.config(&format!("{CONFIG}orphan_grace_secs = 1.5\n"));
    let config = config.to_str().unwrap();
    let s = Server::start(
        &stores,
        &["--config", config],
        &["--verify-every", "100ms", "--repair"],
    );
    let records: Vec<Value> = (1..=6)
        .map(|n| support::record(&support::id(n), "books", "item", n))
        .collect();
    let r = s.post("/api/v1/records", &json!({ "records": records }));
    assert_eq!(r.status, 200, "{}", r.body);
    let point_of_3 = stores.block_on(async {
        let Stores::Servers { schema, .. } = &stores else {
            unreachable!()
        };
        let row = schema
            .admin()
            .await
            .query_one(
                "SELECT point_id::text FROM records WHERE id = $1::text::uuid",
                &[&support::id(3)],
            )
            .await
            .expect("the row");
        row.get::<_, String>(0)
    });

    // Behind the service's back: a row loses its point, and an old orphan
    // appears.
    let Stores::Servers { double, schema, .. } = &stores else {
        unreachable!()
    };
    stores.block_on(async {
        let index = tandem_adapters::qdrant::QdrantVectorIndex::connect(
            tandem_adapters::qdrant::QdrantConfig::new(
                double.url(),
                schema.name().to_owned(),
                support::DIM,
                Distance::Cosine,
            ),
        )
        .await
        .expect("connects");
        index
            .delete(&[point_of_3.parse::<PointId>().expect("a point id")])
            .await
            .expect("the point is deleted");
        index
            .upsert(&[Point {
                id: PointId::new_random(),
                record_id: RecordId::new_random(),
                scope: Scope::new("books"),
                metadata: Default::default(),
                vector: vec![0.0, 1.0, 0.0, 0.0],
                written_at_ms: 1,
            }])
            .await
            .expect("the orphan is written");
    });

    // The service finds both and repairs them.
    let st = s.wait_for_status(Duration::from_secs(60), "the repair", |st| {
        let runs = st["verification"]["passes"].as_u64().unwrap_or(0);
        runs >= 1
            && st["verification"]["inconsistent_scopes"] == 0
            && metric_value(
                &s.get("/metrics").body,
                "tandem_background_runs_total{task=\"repair\"}",
            ) >= Some(1.0)
    });
    let books = st["verification"]["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["scope"] == "books")
        .cloned()
        .expect("books verified");
    assert_eq!(
        (books["rows"].clone(), books["points"].clone()),
        (json!(6), json!(6)),
        "{books}"
    );
    let m = s.get("/metrics").body;
    assert_eq!(
        metric_value(&m, "tandem_background_failures_total{task=\"repair\"}"),
        Some(0.0)
    );
    drop(s);
    let (code, out, err) = stores.cli(&["--config", config, "--json"], &["verify"]);
    assert_eq!(code, 0, "verify after the service's repair: {out}\n{err}");
}

/// The "Sagas by state" panel of one status document, by state.
fn saga_panel(st: &Value) -> Option<std::collections::BTreeMap<String, (u64, bool)>> {
    let panel = st["sections"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == "sagas")?;
    Some(
        panel["rows"]
            .as_array()?
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_owned(),
                    (r["value"].as_u64().unwrap(), r["alert"] == true),
                )
            })
            .collect(),
    )
}

/// One `tandem_sagas{state=…}` value.
fn saga_gauge(metrics: &str, state: &str) -> Option<f64> {
    metric_value(metrics, &format!("tandem_sagas{{state=\"{state}\"}}"))
}

#[test]
fn the_service_shows_sagas_by_state_and_recovery_undoes_a_killed_atomic_ingest() {
    let stores = Stores::servers();
    let config = stores.config(CONFIG);
    let config = config.to_str().unwrap();
    let s = Server::start(
        &stores,
        &["--config", config],
        &["--recover-every", &format!("{RECOVER_EVERY_MS}ms")],
    );
    // Before any saga: every state at 0, nothing in alert.
    let st = s.wait_for_status(Duration::from_secs(30), "the saga panel", |st| {
        saga_panel(st).is_some()
    });
    let panel = saga_panel(&st).unwrap();
    assert_eq!(
        panel.keys().map(String::as_str).collect::<Vec<_>>(),
        ["compensated", "compensating", "done", "failed", "running"],
        "{st:#}"
    );
    assert!(panel.values().all(|&(n, alert)| n == 0 && !alert), "{st:#}");
    let m = s.get("/metrics").body;
    for state in ["running", "compensating", "done", "compensated", "failed"] {
        assert_eq!(saga_gauge(&m, state), Some(0.0), "{state}: {m}");
    }

    let line = |n: u32| {
        json!({
            "id": support::id(n),
            "scope": "books",
            "content": format!("record {n}"),
            "vector": [1.0, n as f32, 0.5, 0.25],
        })
        .to_string()
    };
    let write = |name: &str, lines: &[String]| {
        let p = stores.dir().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").expect("the input");
        p
    };
    let atomic = |input: &std::path::Path| {
        let mut c = tandem(stores.dir());
        c.args(stores.args())
            .args(["--config", config, "-q", "ingest"])
            .arg(input)
            .args(["--batch-size", "2", "--atomic"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };

    // One atomic ingest stands whole (done); one with a bad fourth line is
    // undone by its own process (compensated).
    let good = write("good.jsonl", &(1..=4).map(line).collect::<Vec<_>>());
    assert_eq!(atomic(&good).status().unwrap().code(), Some(0));
    let mut bad: Vec<String> = (5..=7).map(line).collect();
    bad.push("{not json".to_owned());
    let bad = write("bad.jsonl", &bad);
    assert_eq!(atomic(&bad).status().unwrap().code(), Some(2));

    // A third one is killed while its second batch's index write hangs: its
    // saga stays running until the service's recovery claims it (after the
    // lease) and compensates its first batch.
    let faults = stores.double().faults().clone();
    faults.add(RpcFault::always("Upsert", RpcAction::Hang).after(1));
    let killed = write("killed.jsonl", &(8..=11).map(line).collect::<Vec<_>>());
    let mut writer = atomic(&killed)
        .args(["--batch-retries", "1000", "--batch-retry-for", "10m"])
        .spawn()
        .expect("tandem ingest starts");
    let st = s.wait_for_status(Duration::from_secs(60), "a running saga", |st| {
        saga_panel(st).is_some_and(|p| p["running"].0 == 1)
    });
    let panel = saga_panel(&st).unwrap();
    assert_eq!((panel["done"].0, panel["compensated"].0), (1, 1), "{st:#}");
    let m = s.get("/metrics").body;
    assert_eq!(saga_gauge(&m, "running"), Some(1.0), "{m}");
    // Its first batch committed, held by the saga until it ends: counted
    // apart from recovery's backlog (the second batch's intent, in flight).
    let st = s.wait_for_status(Duration::from_secs(30), "the held intent", |st| {
        st["backlog"]["held_intents"] == 1
    });
    let b = &st["backlog"];
    let count = |k: &str| b[k].as_u64().expect(k);
    assert!(
        count("expired_intents") < count("live_intents"),
        "a held intent never counts as expired: {st:#}"
    );
    let m = s.get("/metrics").body;
    assert!(
        m.lines().any(|l| l == "tandem_held_intents 1"),
        "tandem_held_intents: {m}"
    );
    kill9(&mut writer);
    faults.clear();

    let st = s.wait_for_status(Duration::from_secs(60), "the saga compensated", |st| {
        saga_panel(st).is_some_and(|p| p["running"].0 == 0 && p["compensated"].0 == 2)
    });
    let panel = saga_panel(&st).unwrap();
    assert_eq!(
        (panel["done"].0, panel["failed"], panel["compensating"].0),
        (1, (0, false), 0),
        "{st:#}"
    );
    let m = s.get("/metrics").body;
    assert_eq!(saga_gauge(&m, "compensated"), Some(2.0), "{m}");
    assert_eq!(saga_gauge(&m, "running"), Some(0.0), "{m}");
    assert_eq!(saga_gauge(&m, "done"), Some(1.0), "{m}");
    drop(s);

    // Both stores agree afterwards.
    let (code, out, err) = stores.cli(&["--config", config, "--json"], &["verify"]);
    assert_eq!(code, 0, "verify: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).expect("verify's JSON");
    assert_eq!(v["consistent"], true, "{v:#}");
}

/// SIGKILLs a writer and reaps it.
fn kill9(writer: &mut std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writer.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    writer.wait().expect("the writer is gone");
}
