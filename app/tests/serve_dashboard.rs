//! The dashboard in a real browser: headless Chromium loads the page from a
//! running `tandem serve` (PostgreSQL + the Qdrant test server) while a
//! workload with injected index failures runs, and the numbers in the
//! rendered DOM must be exactly those of the status snapshot the page showed
//! (`/api/v1/status?seq=N`, N read from the page). A planted orphan point must
//! turn its scope's verification row red. A screenshot is saved as
//! `target/tmp/serve-dashboard.png` (cargo's temporary directory for tests)
//! and, with `TANDEM_DASHBOARD_SCREENSHOT=path`, copied there: that is how
//! `docs/serve-dashboard.png` is made.
//!
//! Chromium is required: without it the test fails, naming the package to
//! install (`apt-get install -y chromium`; `.ci/run` installs it). Set
//! `CHROMIUM=/path/to/chrome` to use another binary.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::browser::{browse, check_page, chromium, total};
use support::{Server, Stores, id, record};
use tandem_core::{Distance, Point, PointId, RecordId, Scope, VectorIndex};
use tandem_tests::qdrant_double::{RpcAction, RpcFault};

#[test]
fn the_dashboard_shows_exactly_the_status_while_a_faulty_workload_runs() {
    let chromium_dir = tempfile::tempdir().expect("a profile directory");
    // Fail at once, before starting anything, when there is no browser.
    chromium();
    let stores = Stores::servers();
    let s = Server::start(&stores, &[], &["--verify-every", "200ms"]);
    let faults = stores.double().faults().clone();
    let stop = AtomicBool::new(false);

    std::thread::scope(|scope| {
        // The workload: batches of 5, searches, deletes; now and then an
        // index failure that is retried away, one that rolls the batch back,
        // and one that lands partially and is compensated.
        let workload = scope.spawn(|| {
            let mut outcomes = (0u32, 0u32);
            for i in 0..2_000u32 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let fault = match i % 10 {
                    3 => Some(RpcFault::once(
                        "Upsert",
                        RpcAction::FailBefore(tonic::Code::Unavailable),
                    )),
                    6 => Some(RpcFault::always(
                        "Upsert",
                        RpcAction::FailBefore(tonic::Code::Unavailable),
                    )),
                    9 => Some(RpcFault::always(
                        "Upsert",
                        RpcAction::PartialThenFail {
                            applied: 2,
                            code: tonic::Code::Unavailable,
                        },
                    )),
                    _ => None,
                };
                if let Some(f) = fault {
                    faults.add(f);
                }
                let batch: Vec<Value> = (0..5)
                    .map(|j| {
                        record(
                            &id(i * 5 + j),
                            &format!("scope-{}", i % 3),
                            &format!("item-{}", j % 2),
                            j,
                        )
                    })
                    .collect();
                let r = s.post_keyed(
                    "/api/v1/records",
                    &format!("w-{i}"),
                    &json!({ "records": batch }),
                );
                faults.clear();
                match r.status {
                    200 => outcomes.0 += 1,
                    503 => {
                        let e = r.json();
                        assert_eq!(
                            (e["code"].as_str(), e["outcome"].as_str()),
                            (Some("index_unavailable"), Some("not_applied")),
                            "{e}"
                        );
                        outcomes.1 += 1;
                    }
                    other => panic!("unexpected {other}: {}", r.body),
                }
                let r = s.post(
                    "/api/v1/search",
                    &json!({ "vector": [1.0, 2.0, 0.5, 1.0], "k": 5 }),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                if i % 8 == 7 {
                    let r = s.post("/api/v1/records/delete", &json!({ "ids": [id(i * 5)] }));
                    assert_eq!(r.status, 200, "{}", r.body);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            outcomes
        });

        // While it runs: the page agrees with the snapshot it shows.
        s.wait_for_status(Duration::from_secs(60), "the workload under way", |st| {
            total(st, "commits") >= 10 && total(st, "rollbacks") >= 1
        });
        let (_, during) = check_page(&s, chromium_dir.path());
        assert!(total(&during, "commits") >= 10);
        stop.store(true, Ordering::SeqCst);
        let (committed, rolled_back) = workload.join().expect("the workload");
        assert!(
            committed >= 10 && rolled_back >= 1,
            "{committed} committed, {rolled_back} rolled back"
        );
    });

    // An orphan point appears in the index: its scope's row turns red.
    let Stores::Servers { double, schema, .. } = &stores else {
        unreachable!()
    };
    stores.block_on(async {
        let config = tandem_adapters::qdrant::QdrantConfig::new(
            double.url(),
            schema.name().to_owned(),
            support::DIM,
            Distance::Cosine,
        );
        let index = tandem_adapters::qdrant::QdrantVectorIndex::connect(config)
            .await
            .expect("connects");
        index
            .upsert(&[Point {
                id: PointId::new_random(),
                record_id: RecordId::new_random(),
                scope: Scope::new("ghosts"),
                metadata: Default::default(),
                vector: vec![0.0, 1.0, 0.0, 0.0],
                written_at_ms: 1,
            }])
            .await
            .expect("the orphan is written");
    });
    let settled = s.wait_for_status(
        Duration::from_secs(60),
        "the orphan found and the totals still",
        |st| {
            let scopes = st["verification"]["scopes"].as_array().unwrap();
            scopes
                .iter()
                .any(|x| x["scope"] == "ghosts" && x["orphans"] == 1 && x["consistent"] == false)
                && total(st, "compensations") >= 1
        },
    );
    assert_eq!(settled["verification"]["inconsistent_scopes"], 1);
    let (dom, status) = check_page(&s, chromium_dir.path());
    let scopes = status["verification"]["scopes"].as_array().unwrap();
    assert!(scopes.len() >= 4, "{scopes:?}");
    for (i, sc) in scopes.iter().enumerate() {
        let row = format!(
            "<tr class=\"{}\"><td><span data-field=\"/verification/scopes/{i}/scope\"",
            if sc["consistent"] == true { "" } else { "bad" }
        );
        assert!(
            dom.contains(&row),
            "scope {} is not shown as it should be ({row})",
            sc["scope"]
        );
    }
    assert!(total(&status, "rollbacks") >= 1 && total(&status, "compensations") >= 1);

    // A screenshot for people, kept in cargo's temporary directory for tests.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-dashboard.png");
    browse(
        chromium_dir.path(),
        &format!("{}/", s.base),
        &format!("--screenshot={}", shot.display()),
    );
    let png = std::fs::read(&shot).expect("the screenshot is written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    if let Some(copy) = std::env::var_os("TANDEM_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, &copy).expect("the screenshot is copied");
    }
}
