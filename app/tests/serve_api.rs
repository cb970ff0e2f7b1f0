//! `tandem serve`'s HTTP API through a real HTTP client, against the service
//! run as a child process on an ephemeral port: every route and every error
//! class, on the embedded stores and on PostgreSQL + the Qdrant test server;
//! the bearer token; a collection that disappears; the Python client example;
//! and the Grafana dashboard and alert rules against what `/metrics` exports.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Server, Stores, id, metric_names, metric_sum, metric_value, record};

const RECORDS: &str = "/api/v1/records";
const GET: &str = "/api/v1/records/get";
const DELETE: &str = "/api/v1/records/delete";
const SEARCH: &str = "/api/v1/search";

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().expect("a string").to_owned())
        .collect()
}

/// How many of `wanted` the service still has.
fn present(s: &Server, wanted: &[String]) -> usize {
    let r = s.post(GET, &json!({ "ids": wanted }));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["records"].as_array().unwrap().len()
}

/// Every route and error class; the same on every pair of stores.
fn api_contract(stores: &Stores) {
    let s = Server::start(
        stores,
        &[],
        &[
            "--max-batch",
            "50",
            "--max-body-mib",
            "1",
            "--verify-every",
            "100ms",
        ],
    );

    // ------------------------------------------------------------ health
    let r = s.get("/healthz");
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.body);
    let ready = r.json();
    assert_eq!(ready["ready"], true);
    let roles: Vec<_> = ready["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["role"].as_str().unwrap().to_owned(), s["ready"].clone()))
        .collect();
    assert_eq!(
        roles,
        [
            ("metadata".into(), json!(true)),
            ("index".into(), json!(true))
        ]
    );
    let r = s.get("/api/v1/openapi.json");
    assert_eq!(r.status, 200);
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("docs/openapi.json");
    assert!(
        r.body == checked_in,
        "the served OpenAPI document differs from docs/openapi.json: regenerate it with \
         `cargo run -p tandem-app -- serve --print-openapi > docs/openapi.json`"
    );

    // ------------------------------------------------------------ upsert, replay, reuse
    let batch: Vec<Value> = (1..=6)
        .map(|n| {
            let scope = if n % 2 == 1 { "books" } else { "music" };
            record(&id(n), scope, &format!("item-{}", n % 3), n)
        })
        .collect();
    let body = json!({ "records": batch });
    let r = s.post_keyed(RECORDS, "batch-1", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let first = r.json();
    assert_eq!(
        (first["inserted"].clone(), first["replayed"].clone()),
        (json!(6), json!(false))
    );
    let all: Vec<String> = (1..=6).map(id).collect();
    assert_eq!(ids(&first["ids"]), all);
    assert_eq!(r.header("idempotent-replayed"), None);

    // The same call again: answered from the key, nothing written twice.
    let r = s.post_keyed(RECORDS, "batch-1", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let again = r.json();
    assert_eq!(again["replayed"], true);
    assert_eq!(again["intent"], first["intent"]);
    assert_eq!(again["inserted"], 6);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));

    // The same key with another request: refused, nothing written.
    let other = json!({ "records": [record(&id(7), "books", "item-9", 7)] });
    let e = s.post_keyed(RECORDS, "batch-1", &other).error(409);
    assert_eq!(
        (
            e["code"].clone(),
            e["retryable"].clone(),
            e["outcome"].clone()
        ),
        (
            json!("idempotency_key_reused"),
            json!(false),
            json!("not_applied")
        )
    );
    assert_eq!(present(&s, &[id(7)]), 0);

    // ------------------------------------------------------------ get
    let r = s.post(GET, &json!({ "ids": [id(1), id(2), id(99)] }));
    assert_eq!(r.status, 200, "{}", r.body);
    let got = r.json();
    let mut found: Vec<_> = got["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["version"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(found, [(id(1), 1), (id(2), 1)]);
    assert_eq!(ids(&got["missing"]), [id(99)]);
    assert!(
        got["records"][0].get("vector").is_none(),
        "no vectors unless asked"
    );
    let r = s.post(GET, &json!({ "ids": [id(3)], "with_vectors": true }));
    assert_eq!(
        r.json()["records"][0]["vector"],
        json!([1.0, 4.0, 0.5, 0.0])
    );

    // ------------------------------------------------------------ search
    let r = s.post(
        SEARCH,
        &json!({ "vector": [1.0, 2.0, 0.5, 1.0], "k": 2, "scope": "books" }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let hits = r.json()["hits"].as_array().unwrap().clone();
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h["record"]["scope"] == "books"));
    assert!(hits[0]["score"].as_f64() >= hits[1]["score"].as_f64());
    assert_eq!(hits[0]["record"]["id"], id(1), "the nearest record first");
    let r = s.post(
        SEARCH,
        &json!({ "vector": [1.0, 2.0, 0.5, 1.0], "k": 10, "where": {"item": "item-1"} }),
    );
    let hits = r.json()["hits"].as_array().unwrap().clone();
    let mut item1: Vec<_> = hits
        .iter()
        .map(|h| h["record"]["id"].as_str().unwrap().to_owned())
        .collect();
    item1.sort();
    assert_eq!(item1, [id(1), id(4)]);
    let r = s.post(SEARCH, &json!({ "text": "record of item", "k": 3 }));
    assert_eq!(r.status, 200, "{}", r.body);

    // ------------------------------------------------------------ update, deletes
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(1), "books", "item-1", 11)] }),
    );
    assert_eq!(
        (r.json()["updated"].clone(), r.json()["inserted"].clone()),
        (json!(1), json!(0))
    );
    let r = s.post(GET, &json!({ "ids": [id(1)] }));
    assert_eq!(r.json()["records"][0]["version"], 2);
    assert_eq!(r.json()["records"][0]["content"], "record 11 of item-1");

    let r = s.post_keyed(DELETE, "del-1", &json!({ "ids": [id(2)] }));
    assert_eq!(r.json()["deleted"], 1, "{}", r.body);
    let r = s.post_keyed(DELETE, "del-1", &json!({ "ids": [id(2)] }));
    assert_eq!(
        (r.json()["deleted"].clone(), r.json()["replayed"].clone()),
        (json!(1), json!(true))
    );
    // books: 1 (item-1), 3 (item-0), 5 (item-2).
    let r = s.post(
        DELETE,
        &json!({ "scope": "books", "where": {"item": "item-0"} }),
    );
    assert_eq!(r.json()["deleted"], 1, "{}", r.body);
    assert_eq!(present(&s, &[id(3)]), 0);
    // music: 4 and 6 are left.
    let r = s.post(DELETE, &json!({ "scope": "music" }));
    assert_eq!(r.json()["deleted"], 2, "{}", r.body);
    assert_eq!(present(&s, &all), 2, "books 1 and 5 remain");

    // ------------------------------------------------------------ every error class
    let raw = |bytes: &[u8]| s.post_raw(RECORDS, &[("content-type", "application/json")], bytes);
    // A value of the wrong type: its field and its position.
    let e =
        raw(b"{\"records\": [\n  {\"scope\": \"x\", \"vector\": [1, \"a\", 0, 0]}\n]}").error(400);
    assert_eq!(e["code"], "bad_json");
    assert_eq!(e["field"], "records[0].vector[1]");
    assert_eq!(
        (e["line"].clone(), e["column"].clone()),
        (json!(2), json!(34))
    );
    // Broken syntax.
    let e = raw(b"{\"records\": [").error(400);
    assert_eq!(
        (e["code"].clone(), e["line"].clone()),
        (json!("bad_json"), json!(1))
    );
    // An unknown (misspelt) field is an error, not ignored.
    let e = raw(b"{\"records\": [{\"scope\": \"x\", \"vectr\": [1, 0, 0, 0]}]}").error(400);
    assert_eq!(e["field"], "records[0].vectr");
    // Not JSON at all.
    let e = s
        .post_raw(RECORDS, &[("content-type", "text/plain")], b"records")
        .error(415);
    assert_eq!(e["code"], "unsupported_media_type");
    // Larger than --max-body-mib 1.
    let big = vec![b' '; 1536 * 1024];
    let e = raw(&big).error(413);
    assert_eq!(e["code"], "body_too_large");
    // More records than --max-batch 50.
    let many: Vec<Value> = (100..151).map(|n| record(&id(n), "bulk", "x", n)).collect();
    let e = s.post(RECORDS, &json!({ "records": many })).error(413);
    assert_eq!(e["code"], "batch_too_large");
    // A vector of the wrong dimension: named, and nothing of the batch written.
    let wrong = json!({ "records": [
        record(&id(20), "books", "a", 20),
        {"id": id(21), "scope": "books", "vector": [1.0, 2.0]},
    ] });
    let e = s.post(RECORDS, &wrong).error(422);
    assert_eq!(
        (e["code"].clone(), e["field"].clone()),
        (json!("dimension_mismatch"), json!("records[1].vector"))
    );
    assert_eq!(e["outcome"], "not_applied");
    assert_eq!(present(&s, &[id(20), id(21)]), 0);
    let e = s
        .post(
            RECORDS,
            &json!({ "records": [{"scope": "books", "content": "no vector"}] }),
        )
        .error(422);
    assert_eq!(
        (e["code"].clone(), e["field"].clone()),
        (json!("missing_vector"), json!("records[0].vector"))
    );
    let e = s.post(RECORDS, &json!({ "records": [] })).error(400);
    assert_eq!(e["code"], "empty_batch");
    let e = s
        .post(
            RECORDS,
            &json!({ "records": [{"scope": " ", "vector": [1, 0, 0, 0]}] }),
        )
        .error(422);
    assert_eq!(e["code"], "empty_scope");
    let e = s.post(DELETE, &json!({})).error(422);
    assert_eq!(e["code"], "invalid_selector");
    let e = s
        .post(DELETE, &json!({ "ids": [id(1)], "scope": "books" }))
        .error(422);
    assert_eq!(e["code"], "invalid_selector");
    let e = s.post(SEARCH, &json!({ "k": 3 })).error(422);
    assert_eq!(e["code"], "invalid_query");
    let e = s
        .post(SEARCH, &json!({ "vector": [1, 0], "k": 3 }))
        .error(422);
    assert_eq!(
        (e["code"].clone(), e["field"].clone()),
        (json!("dimension_mismatch"), json!("vector"))
    );
    let e = s
        .post(SEARCH, &json!({ "vector": [1, 0, 0, 0], "k": 5000 }))
        .error(422);
    assert_eq!(e["code"], "k_too_large");
    let long_key = "k".repeat(300);
    let e = s.post_keyed(RECORDS, &long_key, &body).error(400);
    assert_eq!(e["code"], "invalid_idempotency_key");
    let e = s.get("/api/v1/nothing-here").error(404);
    assert_eq!(e["code"], "not_found");
    let e = s.get(RECORDS).error(405);
    assert_eq!(e["code"], "method_not_allowed");
    let e = s.get("/api/v1/status?seq=999999").error(404);
    assert_eq!(e["code"], "snapshot_expired");
    assert_eq!(present(&s, &all), 2, "no error wrote anything");

    // ------------------------------------------------------------ status and metrics
    let st = s.wait_for_status(
        Duration::from_secs(30),
        "the writes and a verified store",
        |st| {
            let total = |sid: &str| {
                st["activity"]["series"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["id"] == sid)
                    .map(|x| x["total"].as_u64().unwrap())
            };
            let scopes = st["verification"]["scopes"].as_array().unwrap();
            // upserts: batch-1, the update; deletes: ids, where, scope.
            total("commits") == Some(5)
                && st["http"]["client_errors"].as_u64() >= Some(20)
                && scopes.len() == 1
                && scopes[0]["scope"] == "books"
                && scopes[0]["rows"] == 2
                && scopes[0]["points"] == 2
                && scopes[0]["consistent"] == true
        },
    );
    assert_eq!(st["backlog"]["live_intents"], 0);
    assert!(
        st["stores"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["reachable"] == true)
    );
    let r = s.get(&format!("/api/v1/status?seq={}", st["seq"]));
    assert_eq!(r.json(), st, "a snapshot is served again by its seq");

    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = m.body;
    assert_eq!(
        metric_value(&text, "tandem_commits_total{op=\"upsert\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&text, "tandem_commits_total{op=\"delete\"}"),
        Some(3.0)
    );
    assert!(
        metric_sum(&text, "tandem_phase_seconds_count") >= 5.0,
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "tandem_http_requests_total{route=\"/api/v1/records\",method=\"POST\",status=\"200\"}"
        ) >= Some(3.0),
        "{text}"
    );
    assert!(metric_sum(&text, "tandem_background_runs_total") >= 2.0);
    let (code, stderr) = s.terminate();
    assert_eq!(code, 0, "a clean exit on SIGTERM:\n{stderr}");
}

#[test]
fn the_http_api_on_embedded_stores() {
    api_contract(&Stores::embedded());
}

#[test]
fn the_http_api_on_postgres_and_the_qdrant_test_server() {
    api_contract(&Stores::servers());
}

#[test]
fn a_missing_collection_is_named_by_readyz_and_refused_with_a_stable_code() {
    let stores = Stores::servers();
    let s = Server::start(&stores, &[], &[]);
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(1), "books", "a", 1)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Someone deletes the collection behind the service's back.
    let Stores::Servers { double, schema, .. } = &stores else {
        unreachable!()
    };
    let deleted = stores.block_on(async {
        let config = tandem_adapters::qdrant::QdrantConfig::new(
            double.url(),
            schema.name().to_owned(),
            support::DIM,
            tandem_core::Distance::Cosine,
        );
        let index = tandem_adapters::qdrant::QdrantVectorIndex::connect(config)
            .await
            .expect("connects");
        index.delete_collection().await.expect("deletes")
    });
    assert!(deleted);

    let r = s.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.body);
    let ready = r.json();
    assert_eq!(ready["ready"], false);
    let index = &ready["stores"][1];
    assert_eq!(
        (index["role"].clone(), index["ready"].clone()),
        (json!("index"), json!(false))
    );
    assert!(
        index["name"].as_str().unwrap().contains("Qdrant"),
        "{index}"
    );
    assert!(
        index["error"].as_str().unwrap().contains("not found"),
        "{index}"
    );
    assert_eq!(
        ready["stores"][0]["ready"], true,
        "the metadata store is fine"
    );

    let e = s
        .post(
            RECORDS,
            &json!({ "records": [record(&id(2), "books", "b", 2)] }),
        )
        .error(503);
    assert_eq!(
        (
            e["code"].clone(),
            e["retryable"].clone(),
            e["outcome"].clone()
        ),
        (
            json!("collection_not_found"),
            json!(false),
            json!("not_applied")
        )
    );
    let e = s
        .post(SEARCH, &json!({ "vector": [1, 0, 0, 0] }))
        .error(503);
    assert_eq!(e["code"], "collection_not_found");
    // The dashboard's data says so too, and /metrics.
    s.wait_for_status(
        Duration::from_secs(20),
        "the index shown unreachable",
        |st| st["stores"][1]["reachable"] == false,
    );
    assert_eq!(
        metric_value(&s.get("/metrics").body, "tandem_store_up{store=\"index\"}"),
        Some(0.0)
    );
}

#[test]
fn the_bearer_token_guards_everything_but_health_and_never_shows() {
    const TOKEN: &str = "tok-7f3c9a1e5b2d";
    let stores = Stores::embedded();
    let s = Server::start_with_env(&stores, &[], &[], &[("TANDEM_API_TOKEN", TOKEN)]);

    // Open: health, the page and its assets, the API document.
    for path in [
        "/healthz",
        "/",
        "/assets/dashboard.js",
        "/api/v1/openapi.json",
    ] {
        assert_eq!(s.get_with(path, &[]).status, 200, "{path}");
    }
    // Everything else needs the token.
    for path in ["/readyz", "/metrics", "/api/v1/status"] {
        let r = s.get_with(path, &[]);
        let e = r.error(401);
        assert_eq!(e["code"], "unauthorized", "{path}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"tandem\"")
        );
        let e = s
            .get_with(path, &[("authorization", "Bearer tok-wrong")])
            .error(401);
        assert_eq!(e["code"], "unauthorized");
        let e = s
            .get_with(path, &[("authorization", &format!("Basic {TOKEN}"))])
            .error(401);
        assert_eq!(e["code"], "unauthorized");
        assert_eq!(
            s.get_with(path, &[("authorization", &format!("Bearer {TOKEN}"))])
                .status,
            200,
            "{path}"
        );
    }
    let url = format!("{}{RECORDS}", s.base);
    let body = json!({ "records": [record(&id(1), "books", "a", 1)] }).to_string();
    let no_token = support::agent(Duration::from_secs(30))
        .post(&url)
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .expect("answered");
    assert_eq!(no_token.status(), 401);
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(1), "books", "a", 1)] }),
    );
    assert_eq!(r.status, 200, "with the token: {}", r.body);

    // The token shows nowhere: not in the status, the metrics, the page, an
    // error or the log.
    let st = s.wait_for_status(Duration::from_secs(10), "auth shown as required", |st| {
        st["service"]["auth_required"] == true
    });
    for text in [
        st.to_string(),
        s.get("/metrics").body,
        s.get("/").body,
        s.get_with("/api/v1/status", &[("authorization", "Bearer tok-wrong")])
            .body,
    ] {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
    }
    let (code, stderr) = s.terminate();
    assert_eq!(code, 0);
    assert!(!stderr.contains(TOKEN), "the token leaked into the log");
}

#[test]
fn without_a_token_only_loopback_addresses_are_served() {
    let stores = Stores::embedded();
    let (code, _, stderr) = stores.cli(&[], &["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("TANDEM_API_TOKEN") && stderr.contains("--insecure-listen"),
        "{stderr}"
    );
    // With a token, or an explicit --insecure-listen, it serves.
    let s = Server::start(
        &stores,
        &[],
        &["--listen", "0.0.0.0:0", "--insecure-listen"],
    );
    assert_eq!(s.get("/healthz").status, 200);
    drop(s);
    let s = Server::start_with_env(
        &stores,
        &[],
        &["--listen", "0.0.0.0:0"],
        &[("TANDEM_API_TOKEN", "tok-abcdef")],
    );
    assert_eq!(s.get("/api/v1/status").status, 200);
}

#[test]
fn the_python_client_example_runs_against_the_service() {
    let stores = Stores::embedded();
    let s = Server::start(&stores, &[], &[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/tandem_client.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&s.base)
        .env_remove("TANDEM_API_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("python3 (needed for this test) does not run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It wrote, replayed, searched, saw a typed error and deleted.
    for needle in [
        "inserted 3",
        "replayed: True",
        "best hit: red running shoes",
        "error dimension_mismatch (retryable: False, outcome: not_applied)",
        "deleted 3",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

/// Every `tandem_*` name a deploy file uses.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tandem_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn grafana_and_the_alert_rules_use_only_metrics_that_are_exported() {
    use tandem_tests::qdrant_double::{RpcAction, RpcFault};
    let stores = Stores::servers();
    let s = Server::start(&stores, &[], &["--verify-every", "100ms"]);
    // A little traffic, with one retried and one rolled-back index write.
    let faults = stores.double().faults();
    faults.add(RpcFault::once(
        "Upsert",
        RpcAction::FailBefore(tonic_code_unavailable()),
    ));
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(1), "books", "a", 1)] }),
    );
    assert_eq!(r.status, 200, "a retried write succeeds: {}", r.body);
    faults.add(RpcFault::always(
        "Upsert",
        RpcAction::FailBefore(tonic_code_unavailable()),
    ));
    let e = s
        .post(
            RECORDS,
            &json!({ "records": [record(&id(2), "books", "b", 2)] }),
        )
        .error(503);
    assert_eq!(
        (e["code"].clone(), e["outcome"].clone()),
        (json!("index_unavailable"), json!("not_applied"))
    );
    faults.clear();
    s.post(SEARCH, &json!({ "vector": [1, 0, 0, 0] }));
    s.post(DELETE, &json!({ "ids": [id(1)] }));
    s.wait_for_status(Duration::from_secs(20), "a verification pass", |st| {
        st["verification"]["passes"].as_u64() >= Some(1)
    });
    let exported = metric_names(&s.get("/metrics").body);

    // Every counter, gauge and histogram the coordinator records is exported.
    let recorded = core_metrics();
    assert!(recorded.len() >= 9, "{recorded:?}");
    let missing: Vec<_> = recorded.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the coordinator records {missing:?}, which /metrics lacks"
    );

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for file in ["deploy/grafana/tandem.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect(file);
        let used = names_used(&text);
        assert!(used.len() >= 5, "{file} uses hardly any metric: {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics that /metrics does not export: {unknown:?}\nexported: {exported:?}"
        );
    }
    // The Grafana file is a dashboard document.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/tandem.json")).unwrap(),
    )
    .expect("valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
}

/// The name of every metric `metrics::counter!`, `gauge!` or `histogram!`
/// records in core/src.
fn core_metrics() -> BTreeSet<String> {
    fn walk(dir: &std::path::Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("core/src") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                for kind in [
                    "metrics::counter!(",
                    "metrics::gauge!(",
                    "metrics::histogram!(",
                ] {
                    for rest in text.split(kind).skip(1) {
                        let rest = rest.trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                        {
                            out.insert(name.to_owned());
                        }
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../core/src")),
        &mut out,
    );
    out
}

fn tonic_code_unavailable() -> tonic::Code {
    tonic::Code::Unavailable
}

#[test]
fn bench_api_measures_both_sides_on_the_same_stores() {
    let stores = Stores::embedded();
    let work = stores.dir().display().to_string();
    let (code, out, err) = stores.cli(
        &["--json", "-q"],
        &[
            "bench-api",
            "--batch-size",
            "5",
            "--batches",
            "6",
            "--queries",
            "8",
            "--concurrency",
            "2",
            "--repeat",
            "2",
            "--work-dir",
            &work,
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let results = report["results"].as_array().expect("results");
    let mut seen = Vec::new();
    for r in results {
        let (op, side) = (
            r["operation"].as_str().unwrap(),
            r["side"].as_str().unwrap(),
        );
        seen.push(format!("{op}/{side}"));
        let (calls, records) = (r["calls"].as_u64().unwrap(), r["records"].as_u64().unwrap());
        match op {
            // Two passes per side of 6 batches of 5.
            "upsert" => assert_eq!((calls, records), (12, 60), "{r}"),
            "search" => assert_eq!((calls, records), (16, 0), "{r}"),
            other => panic!("unknown operation {other}"),
        }
        assert!(r["calls_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        let l = &r["latency_ms"];
        assert!(
            0.0 < l["p50"].as_f64().unwrap() && l["p50"].as_f64() <= l["p99"].as_f64(),
            "{r}"
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "search/http",
            "search/library",
            "upsert/http",
            "upsert/library"
        ]
    );
    // It wrote into a temporary directory of its own under --work-dir and
    // left nothing behind.
    let left: Vec<_> = std::fs::read_dir(stores.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("tandem-bench-api-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Deferred writes over HTTP: `?mode=deferred` commits without the index and
/// says so; `&wait=true` answers once the service's index worker made the
/// records searchable; the status document's "Deferred indexing" panel and
/// the lag gauges show the backlog; a bad mode is refused.
#[test]
fn deferred_writes_over_http_become_searchable_through_the_services_worker() {
    let stores = Stores::embedded();
    let s = Server::start(&stores, &[], &["--verify-every", "100ms"]);
    let r = s.post(
        &format!("{RECORDS}?mode=deferred&wait=true&wait_ms=20000"),
        &json!({ "records": [record(&id(1), "books", "a", 1), record(&id(2), "books", "b", 2)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(
        (body["deferred"].clone(), body["wait"].clone()),
        (json!(true), json!("indexed"))
    );
    assert_eq!(body["inserted"], 2);
    // Searchable at once: the answer came after the worker's switch.
    let r = s.post(SEARCH, &json!({ "vector": [1.0, 2.0, 0.5, 1.0], "k": 1 }));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["hits"][0]["record"]["id"],
        json!(id(1)),
        "{}",
        r.body
    );
    assert_eq!(present(&s, &[id(1), id(2)]), 2);

    // Without waiting: the write is deferred; the worker catches up.
    let r = s.post(
        &format!("{RECORDS}?mode=deferred"),
        &json!({ "records": [record(&id(3), "books", "c", 3)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deferred"], true);
    assert!(r.json().get("wait").is_none());
    // The panel, from the metadata store: nothing waiting, and every record
    // the worker indexed counted (all within the last minute: the whole
    // test). Before the writes, it showed nothing waiting and none indexed.
    let indexing = |st: &serde_json::Value, key: &str| {
        st["sections"]
            .as_array()
            .and_then(|sections| sections.iter().find(|x| x["id"] == "indexing"))
            .and_then(|x| x["rows"].as_array())
            .and_then(|rows| rows.iter().find(|r| r["key"] == key))
            .map(|r| r["value"].clone())
    };
    let status = s.wait_for_status(Duration::from_secs(20), "the backlog drained", |st| {
        indexing(st, "indexed_last_minute") == Some(json!(3))
    });
    assert_eq!(indexing(&status, "pending"), Some(json!(0)), "{status}");
    let config = status["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "configuration")
        .unwrap()
        .clone();
    assert!(
        config["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["key"] == "index" && r["value"] == 1),
        "{config}"
    );
    let text = s.get("/metrics").body;
    assert!(
        metric_sum(&text, "tandem_indexed_records_total") >= 3.0,
        "{text}"
    );
    assert_eq!(metric_value(&text, "tandem_index_pending"), Some(0.0));
    assert_eq!(
        metric_value(&text, "tandem_index_indexed_last_minute"),
        Some(3.0),
        "{text}"
    );

    let r = s.post(
        &format!("{RECORDS}?mode=later"),
        &json!({ "records": [record(&id(4), "books", "d", 4)] }),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let (code, stderr) = s.terminate();
    assert_eq!(code, 0, "a clean exit on SIGTERM:\n{stderr}");
}

/// A re-index run by another process while the service serves: the
/// service's "Vector collection" panel names the new collection once it
/// switched, and the service writes to and searches the new one.
#[test]
fn the_service_follows_a_reindex_by_another_process_and_shows_it() {
    let stores = Stores::servers();
    let s = Server::start(&stores, &[], &[]);
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(1), "books", "a", 1), record(&id(2), "books", "b", 2)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let collection = |st: &Value, key: &str| {
        st["sections"]
            .as_array()
            .and_then(|sections| sections.iter().find(|x| x["id"] == "collection"))
            .and_then(|x| x["rows"].as_array())
            .and_then(|rows| rows.iter().find(|r| r["key"] == key))
            .map(|r| r["value"].clone())
    };
    let before = s.wait_for_status(Duration::from_secs(20), "the collection panel", |st| {
        collection(st, "generation").is_some()
    });
    assert_eq!(
        collection(&before, "generation"),
        Some(json!(0)),
        "{before}"
    );

    let (code, out, err) = stores.cli(&[], &["reindex", "--to-collection", "rebuilt"]);
    assert_eq!(code, 0, "reindex: {out}\n{err}");
    let after = s.wait_for_status(Duration::from_secs(20), "the switch shown", |st| {
        collection(st, "active") == Some(json!("rebuilt"))
    });
    assert_eq!(collection(&after, "generation"), Some(json!(1)), "{after}");
    assert_eq!(
        collection(&after, "retired"),
        Some(json!(stores_collection(&stores))),
        "{after}"
    );

    // The service writes into the new collection and finds the records.
    let r = s.post(
        RECORDS,
        &json!({ "records": [record(&id(3), "books", "c", 3)] }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(present(&s, &[id(1), id(2), id(3)]), 3);
    let r = s.post(SEARCH, &json!({ "vector": [1.0, 1.0, 1.0, 1.0], "k": 3 }));
    assert_eq!(r.status, 200, "{}", r.body);
    let mut found: Vec<String> = r.json()["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["record"]["id"].as_str().expect("an id").to_owned())
        .collect();
    found.sort();
    assert_eq!(found, vec![id(1), id(2), id(3)], "{}", r.body);
    let (code, out, err) = stores.cli(&[], &["verify", "--json"]);
    assert_eq!(code, 0, "verify after the switch: {out}\n{err}");
    let (code, err) = s.terminate();
    assert_eq!(code, 0, "a clean exit on SIGTERM:\n{err}");
}

/// The collection the servers' stores were configured with.
fn stores_collection(stores: &Stores) -> String {
    let args = stores.args();
    let at = args
        .iter()
        .position(|a| a == "--collection")
        .expect("servers name their collection");
    args[at + 1].clone()
}
