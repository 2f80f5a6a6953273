//! `shoal net-proxy`: a user-space network emulator for benchmarks.
//!
//! This machine's kernel has no netem or tc, yet lazy fetching is only
//! worth measuring over a link with latency and limited bandwidth. So a
//! TCP proxy stands in front of the real server (a docker-registry, an
//! HTTP server) and plays the link:
//!
//! * every byte arrives half a round trip after it was sent, in each
//!   direction, so a request and its response pay one full RTT; a new
//!   connection pays one more, for the TCP handshake;
//! * each direction has one capacity shared by all connections, as a real
//!   link has, enforced by a token bucket with a small burst.
//!
//! The delay is a timestamp on each chunk read, not a sleep per chunk, so
//! pipelined requests overlap in flight instead of queueing for a delay.

use anyhow::{bail, Context, Result};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The most bytes one read takes off a socket.
const READ_CHUNK: usize = 64 * 1024;
/// The most bytes the link sends ahead of its rate after being idle.
const BURST: usize = 16 * 1024;
/// The most bytes in flight per direction of a connection: enough for a
/// fast link with a long RTT, small enough that a slow link pushes back on
/// the sender (through TCP) instead of buffering a whole download here.
const IN_FLIGHT: usize = 16 << 20;

/// `shoal net-proxy`'s options.
#[derive(clap::Args, Debug)]
pub struct NetProxyArgs {
    /// Where to listen, HOST:PORT; port 0 picks a free one (the address
    /// bound is printed as `listening on ADDR`).
    #[arg(long)]
    listen: String,
    /// Where each connection is forwarded, HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Round-trip time to add, in milliseconds (0: none).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Capacity of each direction in Mbit/s, shared by all connections
    /// (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    mbit: f64,
}

/// Proxies connections to the upstream through the emulated link until
/// the process is killed.
pub fn run(a: &NetProxyArgs) -> Result<()> {
    let link = Arc::new(Link::new(a.rtt_ms, a.mbit)?);
    let upstream: Arc<str> = Arc::from(a.upstream.as_str());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        announce(listener.local_addr()?)?;
        tracing::info!(listen = %a.listen, upstream = %upstream, rtt_ms = a.rtt_ms, mbit = a.mbit, "net-proxy up");
        accept_forever(listener, link, upstream).await;
        Ok(())
    })
}

/// Tells a waiting script the proxy is up, and where (the port may have
/// been picked by the kernel).
fn announce(addr: SocketAddr) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    Ok(())
}

/// Serves each connection on its own task; a failed connection is logged
/// and closed, never the proxy.
async fn accept_forever(listener: TcpListener, link: Arc<Link>, upstream: Arc<str>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather
                // than spin, the condition may pass.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (link, upstream) = (link.clone(), upstream.clone());
        tokio::spawn(async move {
            if let Err(e) = proxy(client, &link, &upstream).await {
                tracing::warn!(%peer, upstream = %upstream, error = %e, "connection failed");
            }
        });
    }
}

/// The emulated link: the same delay both ways, and one capacity per
/// direction shared by every connection.
struct Link {
    /// Half the round-trip time.
    one_way: Duration,
    /// Client to upstream; `None` when unlimited.
    up: Option<TokenBucket>,
    /// Upstream to client; `None` when unlimited.
    down: Option<TokenBucket>,
}

impl Link {
    fn new(rtt_ms: u64, mbit: f64) -> Result<Link> {
        if !mbit.is_finite() || mbit < 0.0 {
            bail!("--mbit must be a non-negative number, not {mbit}");
        }
        if mbit > 0.0 && mbit < 0.001 {
            bail!("--mbit {mbit} is too slow to emulate (at least 0.001, or 0 for no cap)");
        }
        let bucket = || (mbit > 0.0).then(|| TokenBucket::new(mbit * 1e6 / 8.0));
        Ok(Link {
            one_way: Duration::from_millis(rtt_ms) / 2,
            up: bucket(),
            down: bucket(),
        })
    }
}

/// Forwards one client connection to the upstream through the link, both
/// directions at once, until both are closed or either fails.
async fn proxy(mut client: TcpStream, link: &Link, upstream: &str) -> io::Result<()> {
    let accepted = Instant::now();
    let mut server = TcpStream::connect(upstream).await?;
    // Nagle's algorithm would hold back small writes for an ACK, adding
    // delay the link did not ask for.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // The handshake: the client may send once its SYN-ACK is back (one
    // RTT), the server once the client's ACK has reached it (1.5 RTT).
    let rtt = link.one_way * 2;
    let up = Direction {
        one_way: link.one_way,
        open_at: accepted + rtt,
        bucket: link.up.as_ref(),
    };
    let down = Direction {
        one_way: link.one_way,
        open_at: accepted + rtt + link.one_way,
        bucket: link.down.as_ref(),
    };
    let (client_rx, client_tx) = client.split();
    let (server_rx, server_tx) = server.split();
    tokio::try_join!(
        up.pump(client_rx, server_tx),
        down.pump(server_rx, client_tx)
    )?;
    Ok(())
}

/// One direction of one connection.
struct Direction<'a> {
    one_way: Duration,
    /// Nothing leaves before this: the sender's end of the handshake.
    open_at: Instant,
    bucket: Option<&'a TokenBucket>,
}

/// Bytes read from one side, on their way to the other.
struct Chunk {
    /// When they reach the other side (before the bandwidth cap).
    deliver_at: Instant,
    /// Empty: the sender closed its side (a FIN, which is delayed too).
    data: Vec<u8>,
    /// Their share of [`IN_FLIGHT`], returned once they are written.
    _window: OwnedSemaphorePermit,
}

impl Direction<'_> {
    /// Moves bytes from `from` to `to`: a reader stamps each chunk with
    /// its delivery time, a writer waits for it, so chunks are in flight
    /// together, as on a wire.
    async fn pump(
        &self,
        from: impl AsyncRead + Unpin,
        to: impl AsyncWrite + Unpin,
    ) -> io::Result<()> {
        let (tx, rx) = unbounded_channel();
        let window = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::try_join!(self.read_side(from, tx, window), self.write_side(to, rx))?;
        Ok(())
    }

    async fn read_side(
        &self,
        mut from: impl AsyncRead + Unpin,
        tx: UnboundedSender<Chunk>,
        window: Arc<Semaphore>,
    ) -> io::Result<()> {
        loop {
            let mut data = vec![0; READ_CHUNK];
            let n = from.read(&mut data).await?;
            data.truncate(n);
            let deliver_at = Instant::now().max(self.open_at) + self.one_way;
            let permits = u32::try_from(n).map_err(io::Error::other)?;
            let window = window
                .clone()
                .acquire_many_owned(permits)
                .await
                .map_err(io::Error::other)?;
            let chunk = Chunk {
                deliver_at,
                data,
                _window: window,
            };
            // A closed channel means the writer failed; it reports why.
            if tx.send(chunk).is_err() || n == 0 {
                return Ok(());
            }
        }
    }

    async fn write_side(
        &self,
        mut to: impl AsyncWrite + Unpin,
        mut rx: UnboundedReceiver<Chunk>,
    ) -> io::Result<()> {
        while let Some(chunk) = rx.recv().await {
            tokio::time::sleep_until(chunk.deliver_at).await;
            if chunk.data.is_empty() {
                return half_close(&mut to).await;
            }
            self.send(&mut to, &chunk.data).await?;
        }
        Ok(())
    }

    /// Writes `data` no faster than the link's capacity, in pieces no
    /// bigger than its burst so that connections interleave.
    async fn send(&self, to: &mut (impl AsyncWrite + Unpin), data: &[u8]) -> io::Result<()> {
        let Some(bucket) = self.bucket else {
            return to.write_all(data).await;
        };
        for piece in data.chunks(BURST) {
            bucket.take(piece.len()).await;
            to.write_all(piece).await?;
        }
        Ok(())
    }
}

/// Passes on a FIN. A peer that already reset the connection no longer
/// cares, so that is not an error.
async fn half_close(to: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
    match to.shutdown().await {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

/// A token bucket in its GCRA form: one timestamp, when the link will
/// have sent everything booked so far. Senders book in turn and sleep
/// until their bytes fit, so they are served in order, and nobody polls.
///
/// tokio's timer wakes at millisecond granularity, while 16 KiB take
/// 0.13 ms at 1 Gbit/s: a sender woken late would leave the link idle and
/// the rate would fall far short. So a waiter's lateness is made up (the
/// next bookings go on from where the link should have been), while a
/// link that was really idle bursts at most [`BURST`] bytes (plus one
/// late wake-up's worth, if it idled right after one).
struct TokenBucket {
    /// Time on the wire per byte, in seconds.
    secs_per_byte: f64,
    /// How far ahead of the clock the link may be booked: [`BURST`] bytes.
    burst: Duration,
    state: Mutex<Booked>,
}

struct Booked {
    /// When the link is done with every byte booked so far.
    busy_until: Instant,
    /// How late the timer woke the last sender that had to wait.
    late: Duration,
}

impl TokenBucket {
    fn new(bytes_per_sec: f64) -> TokenBucket {
        let secs_per_byte = 1.0 / bytes_per_sec;
        TokenBucket {
            secs_per_byte,
            burst: Duration::from_secs_f64(BURST as f64 * secs_per_byte),
            state: Mutex::new(Booked {
                busy_until: Instant::now(),
                late: Duration::ZERO,
            }),
        }
    }

    /// Books `n` bytes (at most [`BURST`]) on the link and waits until
    /// they may be sent.
    async fn take(&self, n: usize) {
        let ready = self.book(n);
        if ready > Instant::now() {
            tokio::time::sleep_until(ready).await;
            let late = Instant::now().saturating_duration_since(ready);
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.late = late;
        }
    }

    /// Books `n` bytes; returns when they may be sent.
    fn book(&self, n: usize) -> Instant {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // A gap no longer than the last waiter's lateness is the timer's
        // doing, not the link idling: carry on from where the link was.
        let start = if now <= s.busy_until + s.late {
            s.busy_until
        } else {
            s.late = Duration::ZERO;
            now
        };
        s.busy_until = start + Duration::from_secs_f64(n as f64 * self.secs_per_byte);
        s.busy_until.checked_sub(self.burst).unwrap_or(now)
    }
}
