//! A small HTTP/1.1 server with the limits a public endpoint needs, for
//! `kiln serve`.
//!
//! - Each connection has a thread of its own that reads whole requests —
//!   the header within [`Limits::header_bytes`], the body within
//!   [`Limits::body_bytes`], both within [`Limits::read_timeout`] of the
//!   request's first byte — and hands complete requests to a fixed pool of
//!   worker threads. A slow client ties up only its own thread, never a
//!   worker; connections past [`Limits::connections`] are refused with a
//!   503; an idle keep-alive connection is closed after
//!   [`Limits::idle_timeout`]; a thread ends with its connection.
//! - [`Server::run`] returns when `stop` is set, after draining: the
//!   listener closes (new connections are refused), every request already
//!   read is answered (with `Connection: close`), idle and half-read
//!   connections are closed, and whatever is still running after
//!   [`Limits::grace`] is abandoned.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};

/// How long a blocking read or accept waits before looking at the clock
/// and the stop flag again.
const POLL: Duration = Duration::from_millis(50);

/// The server's bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub body_bytes: usize,
    /// Largest request line plus headers, in bytes (431 beyond).
    pub header_bytes: usize,
    /// Time to read one whole request from its first byte (408 beyond).
    pub read_timeout: Duration,
    /// Time an open connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections open at once (503 beyond).
    pub connections: usize,
    /// Threads that handle complete requests.
    pub workers: usize,
    /// Time to drain after the stop flag is set.
    pub grace: Duration,
}

/// A request, read whole.
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Header names lowercased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

/// A response: status, content type, body.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What a handler does with a request.
pub type Handler = dyn Fn(Request) -> Response + Send + Sync;

/// A listening server.
pub struct Server {
    listener: TcpListener,
    limits: Limits,
}

/// A complete request on its way to a worker, and where the answer goes.
type Work = (Request, Sender<Response>);

impl Server {
    /// Binds `addr`.
    pub fn bind(addr: SocketAddr, limits: Limits) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::io(format!("listening on {addr}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
        Ok(Server { listener, limits })
    }

    /// The address it listens on (with the port a `:0` bind chose).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the listening address".to_string(), e))
    }

    /// Serves with `handler` until `stop` is set, then drains.
    pub fn run(self, handler: Arc<Handler>, stop: Arc<AtomicBool>) -> Result<()> {
        let wake = self.local_addr()?;
        let limits = Arc::new(self.limits);
        // Room for every connection's request, so a reader never waits on
        // a full queue for long.
        let (work_tx, work_rx) = sync_channel::<Work>(limits.connections.max(1));
        let work_rx = Arc::new(Mutex::new(work_rx));
        let workers: Vec<_> = (0..limits.workers.max(1))
            .map(|i| {
                let (rx, h) = (Arc::clone(&work_rx), Arc::clone(&handler));
                std::thread::Builder::new()
                    .name(format!("kiln-http-worker-{i}"))
                    .spawn(move || worker(&rx, &*h))
                    .map_err(|e| Error::io("starting an HTTP worker".to_string(), e))
            })
            .collect::<Result<_>>()?;
        let open = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (limits, stop, open) = (Arc::clone(&limits), Arc::clone(&stop), Arc::clone(&open));
            let listener = self.listener;
            std::thread::Builder::new()
                .name("kiln-http-accept".into())
                .spawn(move || accept(listener, &limits, &stop, &open, &work_tx))
                .map_err(|e| Error::io("starting the HTTP acceptor".to_string(), e))?
        };
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(POLL);
        }
        // Wake the acceptor's blocking accept with a connection of our own
        // (it is idle, so the drain closes it at once).
        let ip = match wake.ip() {
            std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        let _ =
            TcpStream::connect_timeout(&SocketAddr::new(ip, wake.port()), Duration::from_secs(1));
        let _ = acceptor.join();
        // Readers see `stop` and close once their request (if any) is answered.
        let deadline = Instant::now() + limits.grace;
        while open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Every reader is gone (or abandoned): the workers finish the queue.
        if open.load(Ordering::SeqCst) == 0 {
            for w in workers {
                let _ = w.join();
            }
        }
        Ok(())
    }
}

/// Accepts connections (blocking, so a burst never waits on a poll
/// interval) until `stop`, then takes what the backlog still holds and
/// closes the listener.
fn accept(
    listener: TcpListener,
    limits: &Arc<Limits>,
    stop: &Arc<AtomicBool>,
    open: &Arc<AtomicUsize>,
    work: &SyncSender<Work>,
) {
    let admit = |stream: TcpStream| {
        if open.load(Ordering::SeqCst) >= limits.connections {
            refuse(stream);
            return;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (limits, stop, work, count) = (
            Arc::clone(limits),
            Arc::clone(stop),
            work.clone(),
            Arc::clone(open),
        );
        let spawned = std::thread::Builder::new()
            .name("kiln-http-conn".into())
            .spawn(move || {
                connection(stream, &limits, &stop, &work);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => admit(stream),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Out of file descriptors and the like: wait and go on.
            Err(_) => std::thread::sleep(POLL),
        }
    }
    // Connections that arrived before the stop are still served.
    if listener.set_nonblocking(true).is_ok() {
        while let Ok((stream, _)) = listener.accept() {
            admit(stream);
        }
    }
}

fn worker(rx: &Mutex<Receiver<Work>>, handler: &Handler) {
    loop {
        let next = rx.lock().map(|r| r.recv());
        match next {
            Ok(Ok((req, reply))) => {
                let _ = reply.send(handler(req));
            }
            _ => return,
        }
    }
}

fn refuse(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let r = Response::json(
        503,
        &serde_json::json!({"error": "too many connections; retry later"}),
    );
    let _ = write_response(&mut stream, &r, true);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, or stayed idle past the idle timeout, or the
    /// server is draining and nothing was pending: close quietly.
    Closed,
    /// A bad or over-limit request: answer with this status and close.
    Reject(u16, String),
}

/// One connection: read requests whole, have workers answer them, write
/// the answers, until the peer closes, a limit is hit or the server drains.
fn connection(mut stream: TcpStream, limits: &Limits, stop: &AtomicBool, work: &SyncSender<Work>) {
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(limits.read_timeout));
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let req = match read_request(&mut stream, &mut buf, limits, stop) {
            Ok(r) => r,
            Err(ReadEnd::Closed) => break,
            Err(ReadEnd::Reject(status, msg)) => {
                let r = Response::json(status, &serde_json::json!({ "error": msg }));
                let _ = write_response(&mut stream, &r, true);
                break;
            }
        };
        let close = wants_close(&req) || stop.load(Ordering::SeqCst);
        let (tx, rx) = channel();
        let response = match work.send((req, tx)).ok().and_then(|_| rx.recv().ok()) {
            Some(r) => r,
            None => Response::json(503, &serde_json::json!({"error": "shutting down"})),
        };
        // A request that arrived while draining is still answered.
        let close = close || stop.load(Ordering::SeqCst);
        if write_response(&mut stream, &response, close).is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn wants_close(req: &Request) -> bool {
    req.headers
        .get("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
}

fn write_response(stream: &mut TcpStream, r: &Response, close: bool) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len(),
        if close { "close" } else { "keep-alive" }
    );
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

/// Reads more bytes into `buf`: `Ok(true)` on data, `Ok(false)` when
/// nothing arrived within one poll, `Err` when the peer closed or failed.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::result::Result<bool, ()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) => Err(()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) =>
        {
            Ok(false)
        }
        Err(_) => Err(()),
    }
}

/// Reads more of a request that has begun; when the server drains and a
/// poll brings nothing, the rest is not coming in time: close.
fn more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    stop: &AtomicBool,
) -> std::result::Result<(), ReadEnd> {
    match fill(stream, buf) {
        Err(()) => Err(ReadEnd::Closed),
        Ok(false) if stop.load(Ordering::SeqCst) => Err(ReadEnd::Closed),
        Ok(_) => Ok(()),
    }
}

/// Where a request head ends — just past its empty line — and how long
/// its text before that line is. Lines end in CRLF, or in a bare LF,
/// which RFC 9112 (§2.2) lets a recipient take as a line end (clients
/// written by hand send them; they had waited out the read timeout).
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(p) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + p;
        let rest = &buf[lf + 1..];
        if rest.starts_with(b"\n") {
            return Some((lf + 2, lf));
        }
        if rest.starts_with(b"\r\n") {
            return Some((lf + 3, lf));
        }
        from = lf + 1;
    }
    None
}

/// Reads one whole request (bytes past it stay in `buf` for the next).
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    stop: &AtomicBool,
) -> std::result::Result<Request, ReadEnd> {
    let reject = |status, msg: &str| ReadEnd::Reject(status, msg.to_string());
    // Wait for the first byte: an idle connection closes after the idle
    // timeout, or at once when the server drains.
    // Whatever has arrived counts as received, so `stop` closes a
    // connection only when a poll brings nothing.
    let idle_since = Instant::now();
    while buf.is_empty() {
        match fill(stream, buf) {
            Err(()) => return Err(ReadEnd::Closed),
            Ok(true) => {}
            Ok(false) => {
                if stop.load(Ordering::SeqCst) || idle_since.elapsed() > limits.idle_timeout {
                    return Err(ReadEnd::Closed);
                }
            }
        }
    }
    let started = Instant::now();
    let timed_out = |started: Instant| started.elapsed() > limits.read_timeout;
    // The head.
    let (head_end, head_len) = loop {
        if let Some((end, len)) = find_head_end(buf) {
            if end > limits.header_bytes {
                return Err(reject(431, "the request head is over the size limit"));
            }
            break (end, len);
        }
        if buf.len() > limits.header_bytes {
            return Err(reject(431, "the request head is over the size limit"));
        }
        if timed_out(started) {
            return Err(reject(408, "the request head took too long to arrive"));
        }
        more(stream, buf, stop)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(reject(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Err(reject(400, "malformed request line"));
    }
    let mut headers = HashMap::new();
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Err(reject(400, "malformed header line"));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        // Two lengths that differ leave the body's end ambiguous, the
        // ground of request smuggling: refused (RFC 9112 §6.3).
        if k == "content-length" && headers.get(&k).is_some_and(|old| *old != v) {
            return Err(reject(400, "conflicting Content-Length headers"));
        }
        headers.insert(k, v);
    }
    if version == "HTTP/1.0" && !headers.contains_key("connection") {
        headers.insert("connection".into(), "close".into());
    }
    if headers.contains_key("transfer-encoding") {
        return Err(reject(
            501,
            "chunked bodies are not accepted: send Content-Length",
        ));
    }
    let length = match headers.get("content-length") {
        None => 0,
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            // Digits past usize are a length over any limit.
            v.parse::<usize>().unwrap_or(usize::MAX)
        }
        Some(_) => return Err(reject(400, "Content-Length is not a number")),
    };
    if length > limits.body_bytes {
        return Err(ReadEnd::Reject(
            413,
            format!("the body is over the {}-byte limit", limits.body_bytes),
        ));
    }
    if length > 0
        && headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        && buf.len() == head_end
    {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    // The body, within the same deadline.
    while buf.len() < head_end + length {
        if timed_out(started) {
            return Err(reject(408, "the request body took too long to arrive"));
        }
        more(stream, buf, stop)?;
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        headers,
        body,
    })
}

/// Whether `given` equals `expected`, in time that depends on their
/// lengths only (never on where they first differ).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, &e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(g ^ e);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"s3cret-token", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret-tokem", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret-token-and-more", b"s3cret-token"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
