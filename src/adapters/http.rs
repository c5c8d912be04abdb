//! A minimal HTTP/1.1 client (one request per connection, plain `http://`): what the Lotus
//! adapter needs to speak JSON-RPC, and what tests use to call the node's API over a real
//! socket — without pulling a full HTTP client stack into the build.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server could not be reached, or the connection broke.
    #[error("{address}: {source}")]
    Io {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP this client can read, or is too large.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// An answer: status code, headers (lower-cased names) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request to `host:port` and reads the whole answer (at most `max_body` bytes).
#[allow(clippy::too_many_arguments)]
pub async fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    max_body: usize,
) -> Result<HttpResponse, HttpError> {
    let address = format!("{host}:{port}");
    let io = |source| HttpError::Io { address: address.clone(), source };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect((host, port)).await.map_err(io)?;
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes).await.map_err(io)?;
    }
    let mut raw = Vec::new();
    let limit = max_body as u64 + 64 * 1024;
    (&mut stream).take(limit + 1).read_to_end(&mut raw).await.map_err(io)?;
    if raw.len() as u64 > limit {
        return Err(HttpError::Malformed(format!("response over {max_body} bytes")));
    }
    parse_response(&raw).map_err(HttpError::Malformed)
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read until close).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP header end")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "HTTP header is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or("no status code")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let rest = &raw[split + 4..];
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| "bad Content-Length")?;
        rest.get(..length).map(<[u8]>::to_vec).ok_or("truncated body")?
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, headers, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&rest[..end]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_length_delimited_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloEXTRA";
        let parsed = parse_response(plain).unwrap();
        assert_eq!((parsed.status, parsed.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(parsed.header("x-a"), Some("b"));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let parsed = parse_response(chunked).unwrap();
        assert_eq!((parsed.status, parsed.body.as_slice()), (404, &b"abcde"[..]));
    }

    proptest::proptest! {
        /// Whatever bytes a server sends, the parser answers with a value or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_response(&bytes);
            let mut framed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = parse_response(&framed);
        }
    }

    #[test]
    fn refuses_what_is_not_http() {
        for bad in [
            &b"garbage"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }
}
