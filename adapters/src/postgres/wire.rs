//! The SQLSTATE of every error the server sends, read off the wire.
//!
//! Why this exists: diesel-async 0.9 turns a tokio-postgres error into
//! `diesel::result::Error::DatabaseError(kind, info)`, where `kind` names
//! only eight SQLSTATEs (unique / foreign-key / not-null / check / restrict /
//! exclusion violation, serialization failure, read-only transaction) and
//! `info` — a `DatabaseErrorInformation` with the message, detail, hint,
//! table, column, constraint and position — has no way to give the code back
//! (diesel's trait has no SQLSTATE accessor; diesel-async's wrapper holding
//! the driver's `DbError` is private). A deadlock, a lock timeout, a
//! terminated backend all arrive as `Unknown` plus a message in the server's
//! `lc_messages` language. Classifying by that text fails on a server that
//! speaks German (or any language but English).
//!
//! So the adapter opens the transport itself and hands tokio-postgres a
//! [`Tapped`] stream: it passes every byte through unchanged and, on the way,
//! follows the backend protocol's message framing (a tag byte and a length)
//! and decodes each `ErrorResponse` — with postgres-protocol, the driver's
//! own parser — keeping its SQLSTATE (field `C`) and primary message (`M`)
//! in the connection's [`ServerErrors`]. Nothing is buffered but the
//! `ErrorResponse` messages themselves (bodies of other messages are only
//! counted past), so it costs no copy of result rows.
//!
//! The diesel error and the recorded one are the same server message,
//! decoded the same way (tokio-postgres decodes fields with
//! `String::from_utf8_lossy` too): [`ServerErrors::code_for`] pairs them by
//! that message, newest first. This is an identity check between two copies
//! of one message, not a reading of its wording, so it works in every
//! language. The tap reads a message before tokio-postgres sees it, so the
//! record is always there by the time diesel returns the error.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::error::SqlState;

/// How many of a connection's latest server errors are kept. A session
/// classifies an error right after the statement that got it; at most two
/// statements are in flight at once (`BEGIN` pipelined with the first
/// statement), so a few are plenty.
const KEPT: usize = 8;

/// The latest errors one connection's server sent, with their SQLSTATEs
/// (see the module docs). Cheap to clone: clones share the record.
///
/// `Debug` shows only how many are kept (messages may quote user data).
#[derive(Clone, Default)]
pub struct ServerErrors {
    reported: Arc<Mutex<VecDeque<Reported>>>,
}

struct Reported {
    code: SqlState,
    message: String,
}

impl fmt::Debug for ServerErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerErrors")
            .field("kept", &self.lock().len())
            .finish()
    }
}

impl ServerErrors {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Reported>> {
        // Every update leaves the queue consistent: a panic elsewhere while
        // it was held does not make it unusable.
        self.reported.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, code: SqlState, message: String) {
        let mut reported = self.lock();
        if reported.len() == KEPT {
            reported.pop_front();
        }
        reported.push_back(Reported { code, message });
    }

    /// The SQLSTATE of the latest server error whose primary message is
    /// `message` (byte for byte), if this connection received one.
    pub fn code_for(&self, message: &str) -> Option<SqlState> {
        self.lock()
            .iter()
            .rev()
            .find(|r| r.message == message)
            .map(|r| r.code.clone())
    }
}

#[cfg(test)]
impl ServerErrors {
    /// What a connection records on receiving `wire` from the server.
    pub(crate) fn scanned(wire: &[u8]) -> Self {
        let errors = Self::default();
        Scanner::new(errors.clone()).feed(wire);
        errors
    }
}

/// Where the scanner is in the server's message stream.
enum Frame {
    /// Reading a message's 5-byte header (tag, then a big-endian length that
    /// counts itself but not the tag).
    Header { buf: [u8; 5], have: usize },
    /// Passing over the rest of a message that is not an `ErrorResponse`.
    Skip(usize),
    /// Collecting an `ErrorResponse`, header included (for the parser).
    Error { message: BytesMut, left: usize },
}

impl Frame {
    const fn header() -> Self {
        Frame::Header {
            buf: [0; 5],
            have: 0,
        }
    }
}

/// Follows the backend message framing and records each `ErrorResponse`.
struct Scanner {
    frame: Frame,
    errors: ServerErrors,
}

/// The `ErrorResponse` tag.
const ERROR_RESPONSE: u8 = b'E';

/// Collected `ErrorResponse` bytes are preallocated up to this much; longer
/// ones grow as they arrive (a length from the wire never sizes an
/// allocation by itself).
const PREALLOCATE: usize = 4096;

impl Scanner {
    fn new(errors: ServerErrors) -> Self {
        Self {
            frame: Frame::header(),
            errors,
        }
    }

    /// Takes the next bytes the server sent, in order.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.frame {
                Frame::Header { buf, have } => {
                    let n = (buf.len() - *have).min(data.len());
                    buf[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == buf.len() {
                        let header = *buf;
                        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                        // The length counts its own 4 bytes; less is a broken
                        // stream, which the driver reports itself.
                        let body = usize::try_from(len.saturating_sub(4)).unwrap_or(usize::MAX);
                        self.frame = if header[0] == ERROR_RESPONSE {
                            let mut message =
                                BytesMut::with_capacity(header.len() + body.min(PREALLOCATE));
                            message.extend_from_slice(&header);
                            Frame::Error {
                                message,
                                left: body,
                            }
                        } else {
                            Frame::Skip(body)
                        };
                    }
                }
                Frame::Skip(left) => {
                    let n = (*left).min(data.len());
                    *left -= n;
                    data = &data[n..];
                }
                Frame::Error { message, left } => {
                    let n = (*left).min(data.len());
                    message.extend_from_slice(&data[..n]);
                    *left -= n;
                    data = &data[n..];
                }
            }
            // A message whose body is empty ends with its header.
            self.complete();
        }
    }

    /// Moves on to the next header once a message's body has been consumed.
    fn complete(&mut self) {
        match &mut self.frame {
            Frame::Skip(0) => self.frame = Frame::header(),
            Frame::Error { message, left: 0 } => {
                let mut message = std::mem::take(message);
                self.frame = Frame::header();
                self.record(&mut message);
            }
            _ => {}
        }
    }

    fn record(&self, message: &mut BytesMut) {
        // A malformed message is the driver's to report; it is just not
        // recorded here.
        let Ok(Some(Message::ErrorResponse(body))) = Message::parse(message) else {
            return;
        };
        let (mut code, mut primary) = (None, None);
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            // Decoded as tokio-postgres decodes them (`DbError::parse`), so
            // the message equals the one diesel's error carries.
            let value = String::from_utf8_lossy(field.value_bytes());
            match field.type_() {
                b'C' => code = Some(SqlState::from_code(&value)),
                b'M' => primary = Some(value.into_owned()),
                _ => {}
            }
        }
        if let (Some(code), Some(primary)) = (code, primary) {
            self.errors.record(code, primary);
        }
    }
}

/// A transport whose incoming bytes are scanned for server errors (see the
/// module docs); reads and writes pass through unchanged.
pub(crate) struct Tapped<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Tapped<S> {
    /// Wraps `inner`, recording its server errors in `errors`.
    pub(crate) fn new(inner: S, errors: ServerErrors) -> Self {
        Self {
            inner,
            scanner: Scanner::new(errors),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend message as the server frames it.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// An `ErrorResponse` as PostgreSQL sends it (severity, code, message,
    /// then more fields).
    pub(crate) fn error_response(code: &str, text: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "FEHLER"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', text),
            (b'F', "deadlock.c"),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        message(b'E', &body)
    }

    /// A stream of messages around two errors: rows (one of which contains
    /// an `E` byte and looks like a header), an empty-bodied message, a
    /// notice.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(message(b'1', b""));
        s.extend(message(b'D', b"\0\x01\0\0\0\x05E\0\0\0\x10"));
        s.extend(error_response("40P01", "Verklemmung entdeckt"));
        s.extend(message(b'N', b"SHINWEIS\0CXX000\0Mnot an error\0\0"));
        s.extend(message(b'Z', b"E"));
        s.extend(error_response(
            "55P03",
            "storniere Anfrage wegen Zeitüberschreitung einer Sperre",
        ));
        s.extend(message(b'Z', b"I"));
        s
    }

    fn assert_recorded(errors: &ServerErrors) {
        assert_eq!(
            errors.code_for("Verklemmung entdeckt"),
            Some(SqlState::T_R_DEADLOCK_DETECTED)
        );
        assert_eq!(
            errors.code_for("storniere Anfrage wegen Zeitüberschreitung einer Sperre"),
            Some(SqlState::LOCK_NOT_AVAILABLE)
        );
        assert_eq!(
            errors.code_for("not an error"),
            None,
            "a notice is no error"
        );
        assert_eq!(errors.code_for("Verklemmung"), None, "whole messages only");
    }

    #[test]
    fn errors_are_recorded_whatever_the_chunking() {
        let s = stream();
        for chunk in [1, 2, 3, 5, 7, 64, s.len()] {
            let errors = ServerErrors::default();
            let mut scanner = Scanner::new(errors.clone());
            for part in s.chunks(chunk) {
                scanner.feed(part);
            }
            assert_recorded(&errors);
            assert!(matches!(scanner.frame, Frame::Header { have: 0, .. }));
        }
    }

    #[test]
    fn the_latest_of_equal_messages_wins_and_few_are_kept() {
        let errors = ServerErrors::default();
        let mut scanner = Scanner::new(errors.clone());
        scanner.feed(&error_response("40001", "same"));
        scanner.feed(&error_response("40P01", "same"));
        assert_eq!(
            errors.code_for("same"),
            Some(SqlState::T_R_DEADLOCK_DETECTED)
        );
        for i in 0..KEPT {
            scanner.feed(&error_response("42P01", &format!("other {i}")));
        }
        assert_eq!(errors.code_for("same"), None);
        assert_eq!(errors.code_for("other 0"), Some(SqlState::UNDEFINED_TABLE));
    }

    #[tokio::test]
    async fn the_tap_passes_every_byte_through() {
        let s = stream();
        let (mut server, client) = tokio::io::duplex(16);
        let errors = ServerErrors::default();
        let mut tapped = Tapped::new(client, errors.clone());
        let sent = s.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            // Reads what the client writes back, then closes.
            let mut echoed = vec![0; 3];
            server.read_exact(&mut echoed).await.unwrap();
            echoed
        });
        let mut got = vec![0; s.len()];
        tapped.read_exact(&mut got).await.unwrap();
        assert_eq!(got, s);
        tapped.write_all(b"abc").await.unwrap();
        tapped.flush().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"abc");
        assert_recorded(&errors);
    }
}
