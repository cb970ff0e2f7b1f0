//! Connection strings that never show their password.

use std::fmt;

/// The placeholder that replaces a password wherever a URL is shown.
const MASK: &str = "***";

/// A database connection string (URL or `key=value` form) whose `Debug` and
/// `Display` replace the password with `***`.
///
/// The raw string is only reachable through [`SecretUrl::expose`], which the
/// adapters call once, to hand it to the driver. Errors and logs use the
/// redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The raw connection string, password included: pass it to the driver, never
    /// to a log or an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection string with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for SecretUrl {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Replaces the password of a connection string, in any of the forms libpq
/// accepts: `scheme://user:password@host/...`, a `password=` query parameter,
/// or a `key=value` string with `password=...`.
pub fn redact(conn: &str) -> String {
    if conn.contains("://") {
        return match url::Url::parse(conn) {
            Ok(url) => redact_url(url),
            // Unparseable: showing any part of it could show the password.
            Err(_) => format!("<unparseable connection URL, {} bytes>", conn.len()),
        };
    }
    redact_key_values(conn)
}

fn redact_url(mut url: url::Url) -> String {
    if url.password().is_some() {
        // Fails only for URLs that cannot have credentials, which have none.
        let _ = url.set_password(Some(MASK));
    }
    let has_secret_param = url
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"));
    if has_secret_param {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// `host=db user=app password='s e c' dbname=x` → `... password=*** ...`.
fn redact_key_values(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while !rest.is_empty() {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        if rest.is_empty() {
            break;
        }
        let key_end = rest.find(['=', ' ']).unwrap_or(rest.len());
        let key = rest[..key_end].trim();
        let (value_start, value_end) = value_span(rest, key_end);
        if key.eq_ignore_ascii_case("password") && value_start <= value_end {
            out.push_str(&rest[..value_start]);
            out.push_str(MASK);
        } else {
            out.push_str(&rest[..value_end]);
        }
        rest = &rest[value_end..];
    }
    out
}

/// Where the value after `key` (ending at `key_end`) starts and where the pair
/// ends, honouring libpq's single quotes and backslash escapes.
fn value_span(s: &str, key_end: usize) -> (usize, usize) {
    let bytes = s.as_bytes();
    let mut i = key_end;
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    if i >= bytes.len() || bytes[i] != b'=' {
        return (i, i);
    }
    i += 1;
    while i < bytes.len() && bytes[i] == b' ' {
        i += 1;
    }
    let start = i;
    if i < bytes.len() && bytes[i] == b'\'' {
        i += 1;
        while i < bytes.len() && bytes[i] != b'\'' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        return (start, (i + 1).min(bytes.len()));
    }
    while i < bytes.len() && bytes[i] != b' ' {
        i += if bytes[i] == b'\\' { 2 } else { 1 };
    }
    (start, i.min(bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_masked() {
        let s = SecretUrl::new("postgres://app:hunter2@db.example:5432/tandem?sslmode=disable");
        assert_eq!(
            s.to_string(),
            "postgres://app:***@db.example:5432/tandem?sslmode=disable"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.expose().contains("hunter2"));
    }

    #[test]
    fn url_without_password_is_unchanged() {
        let s = SecretUrl::new("postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(s.to_string(), "postgres://postgres@127.0.0.1:5432/test");
    }

    #[test]
    fn password_query_parameter_is_masked() {
        let s = SecretUrl::new("postgresql://db/x?user=a&password=p%40ss&application_name=t");
        let shown = s.to_string();
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
        assert!(shown.contains("password=***") || shown.contains("password=%2A%2A%2A"));
        assert!(shown.contains("application_name=t"));
    }

    #[test]
    fn key_value_password_is_masked() {
        assert_eq!(
            redact("host=db user=app password=hunter2 dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        assert_eq!(
            redact("host=db password = 'a b\\' c' dbname=x"),
            "host=db password = *** dbname=x"
        );
    }

    #[test]
    fn unparseable_url_shows_nothing() {
        let shown = redact("postgres://user:pa ss@[::1");
        assert!(!shown.contains("pa ss"), "{shown}");
    }
}
