//! The HTTP forward proxy that confines one ffmpeg run to ALLOWED_STREAM_HOSTS. ffmpeg
//! fetches a playlist's variants, segments and keys (and follows redirects) by itself, so
//! the hosts those URLs name are checked where ffmpeg fetches them: ffmpeg gets
//! `-http_proxy` pointing here, sends every request as `GET http://host:port/path`, and this
//! proxy forwards it only when the host is allowed; any other host gets 403 and is reported
//! to the run, which stops ffmpeg and fails the job naming the host.
//!
//! One proxy per ffmpeg run, on 127.0.0.1 and an ephemeral port: a refusal belongs to the
//! run without tagging requests, and the proxy and every connection it holds end with the
//! run. It speaks plain HTTP only: ffmpeg reaches an https URL through a proxy by a CONNECT
//! tunnel of its `httpproxy` protocol, and allowing that protocol would let a playlist name
//! `httpproxy://any-host/...` and connect past the proxy, so a confined run allows neither
//! (see `ffmpeg_args::confine`).
//!
//! Bounded: at most [`MAX_CONNECTIONS`] at once, a request head of at most
//! [`MAX_HEAD_BYTES`], each read and connect bounded by the run's I/O timeout, and one
//! request per connection (`Connection: close` both ways), so a connection's later requests
//! can never reach the host its first one was checked for.

use super::allowed_hosts::{AllowedHosts, describe_host};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Connections served at once; ffmpeg opens one or two (playlist and segment).
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head read from ffmpeg.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A running proxy. Dropping it stops the listener and every connection.
pub struct StreamProxy {
    addr: SocketAddr,
    refused: watch::Receiver<Option<String>>,
    _tasks: JoinSet<()>,
}

impl StreamProxy {
    /// Listens on 127.0.0.1 (an ephemeral port) for one ffmpeg run.
    pub async fn start(allowed: AllowedHosts, io_timeout: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (refused_tx, refused) = watch::channel(None);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(
            listener,
            Arc::new(Shared {
                allowed,
                io_timeout,
                refused: refused_tx,
            }),
        ));
        Ok(Self {
            addr,
            refused,
            _tasks: tasks,
        })
    }

    /// The value for ffmpeg's `-http_proxy`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first refusal so far, if any.
    pub fn refusal(&self) -> Option<String> {
        self.refused.borrow().clone()
    }

    /// Waits until a request for a host not allowed arrives; gives the refusal (which names
    /// the host and the setting). Never returns while every request is allowed.
    pub async fn refused(&mut self) -> String {
        loop {
            if let Some(r) = self.refused.borrow_and_update().clone() {
                return r;
            }
            if self.refused.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

struct Shared {
    allowed: AllowedHosts,
    io_timeout: Duration,
    /// The first refusal of the run.
    refused: watch::Sender<Option<String>>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connection tasks live in this set, so they end with the proxy.
    let mut conns = JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let sock = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((sock, _)) => break sock,
                    Err(e) => {
                        tracing::debug!(error = %e, "stream proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve(sock, &shared).await {
                tracing::debug!(error = %e, "stream proxy connection ended");
            }
        });
    }
}

/// Why a request was not forwarded, and what ffmpeg is told.
enum Answer {
    BadRequest(String),
    Forbidden(String),
    BadGateway(String),
}

/// Serves one request: check the host, forward the request, copy the answer back.
async fn serve(mut client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let timeout = shared.io_timeout;
    let head = match read_head(&mut client, timeout).await? {
        Some(h) => h,
        None => return Ok(()),
    };
    let answer = match plan_request(&head, &shared.allowed) {
        Err(a) => a,
        Ok(req) => match tokio::time::timeout(timeout, TcpStream::connect(&req.authority)).await {
            Ok(Ok(mut upstream)) => {
                with_timeout(timeout, upstream.write_all(req.head.as_bytes())).await?;
                copy_with_idle_timeout(&mut upstream, &mut client, timeout).await?;
                return client.shutdown().await;
            }
            Ok(Err(e)) => Answer::BadGateway(format!("connecting to {}: {e}", req.authority)),
            Err(_) => Answer::BadGateway(format!("connecting to {} timed out", req.authority)),
        },
    };
    let (status, reason) = match answer {
        Answer::BadRequest(r) => ("400 Bad Request", r),
        Answer::Forbidden(r) => {
            tracing::warn!(refusal = %r, "stream proxy refused a request");
            shared.refused.send_if_modified(|first| {
                let new = first.is_none();
                first.get_or_insert(r.clone());
                new
            });
            ("403 Forbidden", r)
        }
        Answer::BadGateway(r) => ("502 Bad Gateway", r),
    };
    let body = format!("{reason}\n");
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    with_timeout(timeout, client.write_all(reply.as_bytes())).await?;
    client.shutdown().await
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "stream proxy timeout"))?
}

/// Reads a request head (through its blank line); `None` when the client closed first.
async fn read_head(client: &mut TcpStream, timeout: Duration) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = with_timeout(timeout, client.read(&mut buf)).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    head.truncate(end);
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

/// A request allowed through: where to connect and the head to send there.
#[derive(Debug, PartialEq)]
struct Forward {
    /// `host:port` to connect to.
    authority: String,
    head: String,
}

/// Checks a proxy request head and rewrites it for the origin server: the request line in
/// origin form, hop-by-hop and proxy headers dropped, `Connection: close` added.
fn plan_request(head: &str, allowed: &AllowedHosts) -> Result<Forward, Answer> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Answer::BadRequest("malformed request line".into()));
    };
    if !matches!(method, "GET" | "HEAD") {
        // CONNECT included: see the module docs.
        return Err(Answer::BadRequest(format!(
            "method {method} is not served by the stream proxy"
        )));
    }
    let Some(rest) = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
    else {
        return Err(Answer::BadRequest(
            "only absolute http:// targets are served".into(),
        ));
    };
    allowed
        .check_url(target)
        .map_err(|e| Answer::Forbidden(e.0))?;
    let path_at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let path = match &rest[path_at..] {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    // The checked host and port, as a socket address string (ffmpeg sends no user
    // information to a proxy; `describe_host` drops any).
    let authority = describe_host(target);
    let mut out = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim();
        let hop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h));
        if !hop {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Forward {
        authority,
        head: out,
    })
}

/// Copies `from` to `to` until `from` ends; a read that waits longer than `timeout` ends
/// the copy with an error.
async fn copy_with_idle_timeout(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    timeout: Duration,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = with_timeout(timeout, from.read(&mut buf)).await?;
        if n == 0 {
            return Ok(());
        }
        with_timeout(timeout, to.write_all(&buf[..n])).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(s: &str) -> AllowedHosts {
        AllowedHosts::parse(s).unwrap()
    }

    #[test]
    fn an_allowed_request_is_rewritten_to_origin_form_with_one_request_per_connection() {
        let head = "GET http://127.0.0.1:8080/live/seg1.ts?t=1 HTTP/1.1\r\nUser-Agent: Lavf\r\n\
                    Host: 127.0.0.1:8080\r\nConnection: keep-alive\r\nProxy-Connection: x\r\n\r\n";
        let f = plan_request(head, &allowed("127.0.0.1:8080")).ok().unwrap();
        assert_eq!(f.authority, "127.0.0.1:8080");
        assert_eq!(
            f.head,
            "GET /live/seg1.ts?t=1 HTTP/1.1\r\nUser-Agent: Lavf\r\nHost: 127.0.0.1:8080\r\n\
             Connection: close\r\n\r\n"
        );
        let f = plan_request(
            "GET http://h.example HTTP/1.1\r\n\r\n",
            &allowed("h.example"),
        )
        .ok()
        .unwrap();
        assert_eq!(f.authority, "h.example:80");
        assert!(f.head.starts_with("GET / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn connections_are_bounded_in_number_head_size_and_idle_time() {
        let io = Duration::from_millis(1500);
        let mut proxy = StreamProxy::start(allowed("127.0.0.1:1"), io)
            .await
            .unwrap();
        let addr = proxy.addr;
        // A head that never ends is cut off at MAX_HEAD_BYTES.
        let mut big = TcpStream::connect(addr).await.unwrap();
        let _ = big.write_all(&vec![b'a'; MAX_HEAD_BYTES + 4096]).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(1), big.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
        // MAX_CONNECTIONS idle clients hold every slot: the next request waits.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut late = TcpStream::connect(addr).await.unwrap();
        late.write_all(b"GET http://evil.example/ HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(proxy.refusal(), None, "served past the bound");
        // The idle ones are dropped after the I/O timeout, and the waiting one is served.
        let refusal = tokio::time::timeout(Duration::from_secs(5), proxy.refused())
            .await
            .unwrap();
        assert_eq!(
            refusal,
            "host `evil.example:80` is not in ALLOWED_STREAM_HOSTS"
        );
        let mut reply = String::new();
        late.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{reply}");
        let mut idle_reply = [0u8; 8];
        assert_eq!(idle[0].read(&mut idle_reply).await.unwrap(), 0, "closed");
    }

    #[test]
    fn other_hosts_methods_and_forms_are_refused() {
        let list = allowed("127.0.0.1:8080");
        let forbidden = |head: &str| match plan_request(head, &list) {
            Err(Answer::Forbidden(r)) => r,
            _ => panic!("{head:?} was not forbidden"),
        };
        assert_eq!(
            forbidden("GET http://localhost:8080/seg.ts HTTP/1.1\r\n\r\n"),
            "host `localhost:8080` is not in ALLOWED_STREAM_HOSTS"
        );
        forbidden("GET http://127.0.0.1:8081/seg.ts HTTP/1.1\r\n\r\n");
        forbidden("GET http://127.0.0.1:8080@evil.example/ HTTP/1.1\r\n\r\n");
        for head in [
            "CONNECT 127.0.0.1:8080 HTTP/1.1\r\n\r\n",
            "POST http://127.0.0.1:8080/x HTTP/1.1\r\n\r\n",
            "GET /seg.ts HTTP/1.1\r\n\r\n",
            "GET https://127.0.0.1:8080/x HTTP/1.1\r\n\r\n",
            "GET  http://127.0.0.1:8080/x HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(plan_request(head, &list), Err(Answer::BadRequest(_))),
                "{head:?}"
            );
        }
    }
}
