//! Headless Chromium for the dashboard tests: load the page, dump its DOM or
//! take a screenshot, and check every value it shows against the status
//! snapshot it rendered.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Server;

/// The browser: `CHROMIUM`, else the first of the usual names on the PATH.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "this test needs headless Chromium, which is not installed: install it with \
         `apt-get install -y chromium` (Debian/Ubuntu; .ci/run does), or set CHROMIUM to a \
         Chrome/Chromium binary"
    );
}

/// Runs headless Chromium on `url` with `mode` (`--dump-dom` or
/// `--screenshot=...`); returns its stdout.
pub fn browse(profile: &Path, url: &str, mode: &str) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1500",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium().display()));
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().expect("chromium") {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("the reader")
}

/// One number (or text) shown on the page.
#[derive(Debug)]
struct Shown {
    field: String,
    format: String,
    text: String,
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Every `data-field` element of the dumped DOM, and the page's `data-seq`.
fn shown(dom: &str) -> (u64, Vec<Shown>) {
    let seq = dom
        .split("data-seq=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the page rendered no snapshot:\n{dom}"));
    let mut out = Vec::new();
    for part in dom.split("data-field=\"").skip(1) {
        let (field, rest) = part.split_once('"').expect("a closed attribute");
        let format = rest
            .split_once("data-format=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(f, _)| f.to_owned())
            .expect("every field has a format");
        let text = rest
            .split_once('>')
            .and_then(|(_, r)| r.split_once('<'))
            .map(|(t, _)| unescape(t))
            .expect("the element's text");
        out.push(Shown {
            field: field.to_owned(),
            format,
            text,
        });
    }
    (seq, out)
}

fn number(text: &str) -> f64 {
    text.trim_end_matches('%')
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a number"))
}

/// Whether the text the page shows is `value` written in `format` (as
/// dashboard.js writes it; decimals are compared to their rounding).
fn agrees(value: &Value, format: &str, text: &str) -> bool {
    if value.is_null() {
        return text == "–";
    }
    let close = |x: f64, decimals: i32| {
        let shown = number(text);
        (shown - x).abs() <= 0.5 * 10f64.powi(-decimals) + 1e-9
    };
    match format {
        "count" => number(text) == value.as_f64().expect("a number").round(),
        "ms" => close(value.as_f64().expect("a number"), 2),
        "secs" => close(value.as_f64().expect("a number"), 1),
        "pct" => text.ends_with('%') && close(value.as_f64().expect("a number") * 100.0, 1),
        "bool" => text == if value == &json!(true) { "yes" } else { "no" },
        "text" => value.as_str().is_some_and(|v| v == text),
        "time" => !text.is_empty() && text != "–",
        "auto" => match value {
            Value::Bool(b) => text == if *b { "yes" } else { "no" },
            Value::String(s) => s == text,
            Value::Number(n) if n.is_i64() || n.is_u64() => number(text) == n.as_f64().unwrap(),
            Value::Number(n) => close(n.as_f64().unwrap(), 2),
            _ => false,
        },
        other => panic!("unknown format {other}"),
    }
}

/// Loads the page, and checks every value on it against the snapshot it
/// shows. Returns the DOM and that snapshot.
pub fn check_page(s: &Server, profile: &Path) -> (String, Value) {
    let dom = browse(profile, &format!("{}/", s.base), "--dump-dom");
    let (seq, fields) = shown(&dom);
    let r = s.get(&format!("/api/v1/status?seq={seq}"));
    assert_eq!(r.status, 200, "snapshot {seq}: {}", r.body);
    let status = r.json();
    assert!(
        fields.len() >= 40,
        "only {} values on the page",
        fields.len()
    );
    for f in &fields {
        let value = status.pointer(&f.field).unwrap_or_else(|| {
            panic!(
                "the page shows {} which snapshot {seq} does not have",
                f.field
            )
        });
        assert!(
            agrees(value, &f.format, &f.text),
            "snapshot {seq}: {} is {value} but the page shows {:?} ({})",
            f.field,
            f.text,
            f.format
        );
    }
    // Every panel is there, and the chart was drawn by the vendored library.
    for needle in [
        "panel-activity",
        "panel-phases",
        "panel-intents",
        "panel-verification",
        "panel-http",
        "panel-section-configuration",
        "class=\"uplot",
        "<canvas",
    ] {
        assert!(dom.contains(needle), "the page lacks {needle}");
    }
    for (i, series) in status["activity"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert!(
            fields
                .iter()
                .any(|f| f.field == format!("/activity/series/{i}/total")),
            "the page does not show {}",
            series["id"]
        );
    }
    (dom, status)
}

pub fn total(status: &Value, series: &str) -> u64 {
    status["activity"]["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == series)
        .and_then(|x| x["total"].as_u64())
        .unwrap_or_else(|| panic!("no series {series}"))
}
