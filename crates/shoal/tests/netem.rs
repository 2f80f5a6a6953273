//! `shoal net-proxy`, the user-space network emulator: the real binary in
//! front of small in-test servers, measured with the wall clock. Only
//! lower bounds are tight; upper bounds are loose, for a busy machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A running `shoal net-proxy`, killed when dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr, opts: &[&str]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["net-proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .args(opts)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting shoal net-proxy");
        let stdout = child.stdout.take().expect("piped stdout");
        // Owned by the guard from here, so a failed assertion still kills it.
        let mut proxy = Proxy {
            child,
            addr: upstream,
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the proxy's stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        proxy.addr = addr.parse().expect("a socket address");
        proxy
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connecting to the proxy");
        s.set_nodelay(true).expect("TCP_NODELAY");
        s
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server on a free port that hands each connection to `handle` on its
/// own thread, for as long as the test process runs.
fn server(handle: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a test server");
    let addr = listener.local_addr().expect("local address");
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || handle(conn));
        }
    });
    addr
}

/// Sends back everything it reads, then closes.
fn echo(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    if let Ok(mut r) = conn.try_clone() {
        let _ = std::io::copy(&mut r, &mut conn);
    }
}

/// A tiny HTTP server: `GET /N` answers with N bytes, then closes.
fn http(conn: TcpStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Read the whole header: closing with unread bytes would send a reset.
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) && line != "\r\n" {
        line.clear();
    }
    let len: usize = request
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_start_matches('/').parse().ok())
        .unwrap_or(0);
    let mut conn = conn;
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&vec![b'x'; len]);
}

/// Downloads `len` bytes over a new connection; returns the body size.
fn download(proxy: &Proxy, len: usize) -> usize {
    let mut s = proxy.connect();
    write!(s, "GET /{len} HTTP/1.1\r\nHost: test\r\n\r\n").expect("sending the request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("reading the response");
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header")
        + 4;
    response.len() - body
}

/// One request/response exchange of `n` bytes on `s`.
fn round_trip(s: &mut TcpStream, n: usize) -> Duration {
    let msg = vec![b'p'; n];
    let mut back = vec![0; n];
    let t = Instant::now();
    s.write_all(&msg).expect("writing");
    s.read_exact(&mut back).expect("reading the echo");
    assert_eq!(back, msg);
    t.elapsed()
}

#[test]
fn rtt_delays_each_round_trip_once() {
    let proxy = Proxy::start(server(echo), &["--rtt-ms", "40"]);
    let mut s = proxy.connect();
    // The first exchange also pays for the emulated TCP handshake.
    let first = round_trip(&mut s, 16);
    println!("first exchange (handshake + request): {first:?}");
    assert!(first >= Duration::from_millis(80), "{first:?}");
    for _ in 0..5 {
        let rt = round_trip(&mut s, 16);
        println!("round trip on an established connection: {rt:?}");
        assert!(rt >= Duration::from_millis(40), "{rt:?}");
        assert!(rt < Duration::from_millis(400), "{rt:?}");
    }
}

#[test]
fn pipelined_requests_share_one_delay() {
    let proxy = Proxy::start(server(echo), &["--rtt-ms", "40"]);
    let mut s = proxy.connect();
    round_trip(&mut s, 1);
    // Ten small writes in a row, then all the answers: the delay applies
    // to each byte in flight, not once per write after the other.
    let t = Instant::now();
    for _ in 0..10 {
        s.write_all(b"0123456789").expect("writing");
        thread::sleep(Duration::from_millis(2));
    }
    let mut back = [0; 100];
    s.read_exact(&mut back).expect("reading the echoes");
    let took = t.elapsed();
    println!("10 pipelined requests: {took:?}");
    assert!(took >= Duration::from_millis(40), "{took:?}");
    assert!(took < Duration::from_millis(200), "{took:?}");
}

#[test]
fn mbit_caps_a_download() {
    let proxy = Proxy::start(server(http), &["--mbit", "80"]);
    let t = Instant::now();
    assert_eq!(download(&proxy, 5_000_000), 5_000_000);
    let took = t.elapsed();
    // 5 MB at 80 Mbit/s is 0.5 s, less the burst allowed after idle.
    println!("5 MB download at 80 Mbit/s: {took:?}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn mbit_is_shared_by_all_connections() {
    let proxy = Proxy::start(server(http), &["--mbit", "80"]);
    let t = Instant::now();
    thread::scope(|s| {
        let a = s.spawn(|| download(&proxy, 2_500_000));
        let b = s.spawn(|| download(&proxy, 2_500_000));
        assert_eq!(a.join().expect("download a"), 2_500_000);
        assert_eq!(b.join().expect("download b"), 2_500_000);
    });
    let took = t.elapsed();
    println!("2 x 2.5 MB downloads at once at 80 Mbit/s: {took:?}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn data_passes_through_unchanged() {
    let proxy = Proxy::start(server(echo), &[]);
    // xorshift: cheap bytes with no pattern a bug could hide in.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let mut s = proxy.connect();
    let mut w = s.try_clone().expect("cloning the socket");
    let t = Instant::now();
    let back = thread::scope(|sc| {
        // Write while reading, or both sides' buffers fill and stall.
        sc.spawn(|| {
            w.write_all(&data).expect("writing");
            w.shutdown(Shutdown::Write).expect("half-closing");
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("reading the echo");
        back
    });
    println!("3 MB echoed with no options: {:?}", t.elapsed());
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
}
