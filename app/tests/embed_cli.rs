//! `tandem ingest --embed openai` and `tandem search --text` against the
//! OpenAI-compatible test server, started in this process; `tandem` runs as
//! a child process on the embedded stores of a temporary directory.
//!
//! Each case is one documented behaviour (docs/embeddings.md): records get
//! the server's vectors; transient failures are retried; a batch whose
//! embedding failed is not written (and the ones before it are); a
//! dimension mismatch is a usage error before anything is written; the API
//! key shows nowhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tandem_tests::embed_server::{EmbedServer, Fault};

const DIM: usize = 8;
const KEY: &str = "sk-cli-test-key-0123456789";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A working directory with its data directory, and the server.
struct Sandbox {
    dir: tempfile::TempDir,
    server: EmbedServer,
}

impl Sandbox {
    fn new(api_key: Option<&str>) -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            server: EmbedServer::start_in_background(DIM, api_key).expect("the server starts"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("the file is written");
        p
    }

    /// `tandem` on the embedded stores (dimension 8), with `env` set and no
    /// other configuration leaking in.
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        self.run_dim(DIM, args, env)
    }

    /// [`run_env`](Self::run_env) with another `--dim`.
    fn run_dim(&self, dim: usize, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
        for var in [
            "DATABASE_URL",
            "QDRANT_URL",
            "QDRANT_API_KEY",
            "TANDEM_CONFIG",
            "TANDEM_DATA_DIR",
            "TANDEM_METRICS_ADDR",
            "TANDEM_EMBED",
            "TANDEM_EMBED_URL",
            "TANDEM_EMBED_MODEL",
            "TANDEM_EMBED_DIMENSIONS",
            "TANDEM_EMBED_API_KEY",
            "OPENAI_API_KEY",
            "RUST_LOG",
        ] {
            c.env_remove(var);
        }
        c.envs(env.iter().copied());
        let data = self.path().join("data");
        let dim = dim.to_string();
        c.current_dir(self.path())
            .args(["--data-dir", data.to_str().unwrap(), "--dim", &dim])
            .args(args)
            .stdin(Stdio::null());
        let out = c.output().expect("tandem runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// `ingest FILE --embed openai` against the server, with `extra` flags.
    fn ingest(&self, file: &Path, extra: &[&str]) -> Run {
        let url = self.server.base_url();
        let mut args = vec![
            "ingest",
            file.to_str().unwrap(),
            "--embed",
            "openai",
            "--embed-url",
            &url,
            "--embed-model",
            "test-model",
            "--json",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn rows(&self) -> u64 {
        let r = self.run(&["stats", "--json"]);
        assert_eq!(r.code, 0, "stats: {}", r.stderr);
        r.json()["rows"].as_u64().expect("rows")
    }

    fn assert_consistent(&self) {
        let r = self.run(&["verify", "--json"]);
        assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);
    }
}

fn content(n: u32) -> String {
    format!("catalog item {n}: a thing of kind {}", n % 3)
}

/// `n` records without vectors, ids 1..=n.
fn records(n: u32, poison: Option<u32>) -> String {
    (1..=n)
        .map(|i| {
            let text = if Some(i) == poison {
                format!("{} poison", content(i))
            } else {
                content(i)
            };
            json!({
                "id": format!("00000000-0000-4000-8000-{i:012}"),
                "scope": "catalog",
                "content": text,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

#[test]
fn ingest_with_openai_stores_the_servers_vectors_and_search_text_finds_them() {
    let s = Sandbox::new(None);
    let f = s.write("in.jsonl", &records(5, None));
    let r = s.ingest(&f, &["--batch-size", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["records"], 5);
    assert_eq!(v["inserted"], 5);
    assert_eq!(v["records_embedded"], 5);
    assert_eq!(v["batches_committed"], 3);
    // One dimension check, then one request per batch, all for the model.
    let seen = s.server.requests();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|r| r.model == "test-model"));
    assert_eq!(seen[1].texts, vec![content(1), content(2)]);
    s.assert_consistent();

    // The stored vector of record 3 is the server's vector of its content.
    let q = serde_json::to_string(&s.server.vector(&content(3))).unwrap();
    let r = s.run(&["search", "--vector", &q, "-k", "1", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let hits = r.json();
    assert_eq!(hits[0]["content"], content(3));
    assert!(hits[0]["score"].as_f64().unwrap() > 0.9999, "{hits}");

    // search --text embeds the query with the same embedder.
    let url = s.server.base_url();
    let r = s.run(&[
        "search",
        "--text",
        &content(4),
        "--embed",
        "openai",
        "--embed-url",
        &url,
        "--embed-model",
        "test-model",
        "-k",
        "2",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let hits = r.json();
    assert_eq!(hits[0]["content"], content(4));
    assert!(hits[0]["score"].as_f64().unwrap() > 0.9999, "{hits}");
    assert_eq!(s.server.requests().last().unwrap().texts, vec![content(4)]);
}

#[test]
fn a_batch_whose_embedding_fails_permanently_writes_nothing_of_it() {
    let s = Sandbox::new(None);
    s.server
        .faults()
        .when_input_contains("poison", Fault::Status(400));
    let f = s.write("in.jsonl", &records(6, Some(4)));
    let r = s.ingest(&f, &["--batch-size", "2"]);
    assert_eq!(r.code, 2, "a refused input is exit 2: {}", r.stderr);
    assert!(
        r.stderr
            .contains("batch 2 (lines 3–4) was not written: embedding with model \"test-model\""),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("HTTP 400"), "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["batches_committed"], 1);
    assert_eq!(v["batches_failed"], 1);
    assert_eq!(v["error"]["batch"], 2);
    // Batch 1 is written; nothing of batch 2 (or after it).
    assert_eq!(s.rows(), 2);
    s.assert_consistent();
    // Not retried: one request held the poison.
    let poisoned = s
        .server
        .requests()
        .iter()
        .filter(|r| r.texts.iter().any(|t| t.contains("poison")))
        .count();
    assert_eq!(poisoned, 1);
}

#[test]
fn an_embedding_server_that_stays_unavailable_stops_the_ingest_with_exit_3() {
    let s = Sandbox::new(None);
    s.server
        .faults()
        .when_input_contains("poison", Fault::Status(503));
    let f = s.write("in.jsonl", &records(4, Some(3)));
    let r = s.ingest(&f, &["--batch-size", "2", "--embed-retries", "2"]);
    assert_eq!(r.code, 3, "unavailable is exit 3: {}", r.stderr);
    assert!(
        r.stderr.contains("batch 2 (lines 3–4) was not written"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("unavailable"), "{}", r.stderr);
    let poisoned = s
        .server
        .requests()
        .iter()
        .filter(|r| r.texts.iter().any(|t| t.contains("poison")))
        .count();
    assert_eq!(poisoned, 3, "the first attempt and 2 retries");
    assert_eq!(s.rows(), 2);
    s.assert_consistent();
}

#[test]
fn transient_embedding_failures_are_retried_and_the_ingest_completes() {
    let s = Sandbox::new(None);
    let faults = s.server.faults();
    // The dimension check meets the first, batch 1 the others.
    faults.next(Fault::RateLimited {
        retry_after_secs: Some(0.2),
    });
    faults.next(Fault::Status(500));
    faults.next(Fault::Hang);
    let f = s.write("in.jsonl", &records(4, None));
    let r = s.ingest(&f, &["--batch-size", "2", "--embed-timeout", "500ms"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["records"], 4);
    let met: Vec<_> = s
        .server
        .requests()
        .into_iter()
        .filter_map(|r| r.fault)
        .collect();
    assert_eq!(met.len(), 3, "{met:?}");
    assert_eq!(s.rows(), 4);
    s.assert_consistent();
}

#[test]
fn a_dimension_mismatch_is_a_usage_error_before_anything_is_written() {
    let s = Sandbox::new(None);
    s.server.faults().next(Fault::WrongDimension(12));
    let f = s.write("in.jsonl", &records(2, None));
    let r = s.ingest(&f, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("vectors of 12 dimensions")
            && r.stderr.contains("dimension is 8 (--dim)"),
        "{}",
        r.stderr
    );
    assert_eq!(s.server.requests().len(), 1, "only the check was sent");
    assert_eq!(s.rows(), 0);

    // --embed-dimensions that differ from --dim: refused before any request.
    let r = s.ingest(&f, &["--embed-dimensions", "16"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("(16, --embed-dimensions)") && r.stderr.contains("(8, --dim)"),
        "{}",
        r.stderr
    );
    assert_eq!(s.server.requests().len(), 1);
}

#[test]
fn the_api_key_comes_from_the_environment_and_shows_nowhere() {
    let s = Sandbox::new(Some(KEY));
    let f = s.write("in.jsonl", &records(2, None));
    let url = s.server.base_url();
    let args = [
        "ingest",
        f.to_str().unwrap(),
        "--embed",
        "openai",
        "--embed-url",
        &url,
        "--embed-model",
        "test-model",
        "-vvv",
        "--json",
    ];
    // A wrong key: refused, exit 1, not retried, the key nowhere.
    let wrong = "sk-wrong-key-abcdefghijkl";
    let r = s.run_env(&args, &[("TANDEM_EMBED_API_KEY", wrong)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("refused the credentials"), "{}", r.stderr);
    assert!(!r.stderr.contains(wrong) && !r.stdout.contains(wrong));
    assert_eq!(s.server.requests().len(), 1);
    // The right one, from OPENAI_API_KEY: written; with -vvv the key still
    // shows nowhere.
    let r = s.run_env(&args, &[("OPENAI_API_KEY", KEY)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stderr.contains(KEY) && !r.stdout.contains(KEY),
        "{}",
        r.stderr
    );
    assert!(s.server.requests()[1..].iter().all(|r| r.authorized));
    assert_eq!(s.rows(), 2);
}

#[test]
fn the_embed_section_of_the_config_file_lies_under_the_flags() {
    let s = Sandbox::new(None);
    s.write(
        "tandem.toml",
        &format!(
            "[embed]\nmode = \"openai\"\nurl = \"{}\"\nmodel = \"from-file\"\nbatch_texts = 2\n",
            s.server.base_url()
        ),
    );
    let f = s.write("in.jsonl", &records(5, None));
    let r = s.run(&["ingest", f.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let seen = s.server.requests();
    assert!(seen.iter().all(|r| r.model == "from-file"));
    // batch_texts = 2: the batch of 5 went as 2 + 2 + 1 (after the check).
    // The three requests run concurrently, so they arrive in any order.
    let mut sizes: Vec<usize> = seen[1..].iter().map(|r| r.texts.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 2, 2]);
    // A flag wins over the file.
    let r = s.run(&[
        "search",
        "--text",
        "anything",
        "--embed-model",
        "from-flag",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.server.requests().last().unwrap().model, "from-flag");
}

#[test]
fn openai_without_a_url_or_model_is_a_usage_error() {
    let s = Sandbox::new(None);
    let f = s.write("in.jsonl", &records(1, None));
    let r = s.run(&["ingest", f.to_str().unwrap(), "--embed", "openai"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--embed-url"), "{}", r.stderr);
    let url = s.server.base_url();
    let r = s.run(&[
        "ingest",
        f.to_str().unwrap(),
        "--embed",
        "openai",
        "--embed-url",
        &url,
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--embed-model"), "{}", r.stderr);
    assert!(s.server.requests().is_empty());
}

/// `tandem reindex --embed openai` re-embeds every record with a new model
/// into a collection of a new dimension and switches; later processes
/// configured for the new model find records by their new vectors, and the
/// stores agree exactly.
#[test]
fn reindex_re_embeds_into_a_new_dimension_and_later_processes_search_it() {
    const NEW_DIM: usize = 12;
    let s = Sandbox::new(None);
    let f = s.write("in.jsonl", &records(7, None));
    let r = s.ingest(&f, &["--batch-size", "3"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let before = s.server.requests().len();

    let url = s.server.base_url();
    let new_dim = NEW_DIM.to_string();
    let embed_new = [
        "--embed",
        "openai",
        "--embed-url",
        url.as_str(),
        "--embed-model",
        "new-model",
        "--embed-dimensions",
        new_dim.as_str(),
    ];
    let mut args = vec!["reindex", "--to-collection", "v2", "--to-dim", &new_dim];
    args.extend(embed_new);
    args.push("--json");
    let r = s.run(&args);
    assert_eq!(r.code, 0, "reindex: {}\n{}", r.stdout, r.stderr);
    let report = r.json();
    assert_eq!(report["switched"], true, "{report}");
    assert_eq!(report["state"]["active"], "v2", "{report}");
    // Every record's content went to the new model, in the new dimension.
    let embedded: Vec<String> = s.server.requests()[before..]
        .iter()
        .filter(|q| q.model == "new-model")
        .flat_map(|q| q.texts.clone())
        .collect();
    for n in 1..=7 {
        assert!(embedded.contains(&content(n)), "{n} not re-embedded");
    }

    // A later process of the new model finds record 4 by its new vector.
    let mut args = vec!["search", "--text"];
    let text = content(4);
    args.push(&text);
    args.extend(embed_new);
    args.extend(["-k", "1", "--json"]);
    let r = s.run_dim(NEW_DIM, &args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let hits = r.json();
    assert_eq!(hits[0]["content"], content(4), "{hits}");
    assert!(hits[0]["score"].as_f64().unwrap() > 0.9999, "{hits}");
    let r = s.run_dim(NEW_DIM, &["verify", "--json"], &[]);
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);
}
