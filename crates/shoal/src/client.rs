//! A minimal HTTP/1.1 client for the daemon's Unix socket.
//!
//! Written by hand on purpose: the common HTTP client crates (ureq, reqwest)
//! do not speak Unix sockets, and hyper's client needs hyper-util and an
//! async runtime for what is one request per CLI call. This handles exactly
//! what our own server sends: a status line, headers, and a body delimited
//! by Content-Length, chunked encoding, or connection close.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("SHOAL_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(crate::daemon::DEFAULT_SOCKET))
}

pub struct Reply {
    pub status: u16,
    pub body: Box<dyn Read>,
}

pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    json: Option<&serde_json::Value>,
) -> Result<Reply> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the shoal daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let body = json.map(|j| j.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse::<u64>().ok(),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
    }
    let body: Box<dyn Read> = if chunked {
        Box::new(Chunked {
            r,
            left: 0,
            done: false,
        })
    } else if let Some(n) = length {
        Box::new(r.take(n))
    } else {
        Box::new(r)
    };
    Ok(Reply { status, body })
}

/// Send a request and return its JSON reply, turning API errors into errors.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    json: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let mut reply = request(socket, method, path, json)?;
    let mut text = String::new();
    reply.body.read_to_string(&mut text)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("daemon replied {text:?}"))?;
    if reply.status >= 400 {
        bail!("{}", v["error"].as_str().unwrap_or(&text));
    }
    Ok(v)
}

/// `POST` a typed request, read the typed reply.
pub fn post<Rep: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
    req: &impl serde::Serialize,
) -> Result<Rep> {
    let body = serde_json::to_value(req).expect("requests serialize");
    let v = call(socket, "POST", path, Some(&body))?;
    serde_json::from_value(v).with_context(|| format!("the daemon's reply to {path}"))
}

/// `GET` a typed reply.
pub fn get<Rep: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> Result<Rep> {
    let v = call(socket, "GET", path, None)?;
    serde_json::from_value(v).with_context(|| format!("the daemon's reply to {path}"))
}

struct Chunked<R> {
    r: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.r.read_line(&mut line)?;
            if line.trim().is_empty() {
                line.clear();
                self.r.read_line(&mut line)?;
            }
            if line.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "body ended early: the daemon's read failed (EIO; its log names blob, range and cause)",
                ));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let got = self.r.read(&mut buf[..n])?;
        if got == 0 {
            // The server aborts the body when a read fails (EIO upstream).
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "body ended early: the daemon's read failed",
            ));
        }
        self.left -= got as u64;
        Ok(got)
    }
}
