//! Fault injection that stays in the suite (issue 11 #7): the request-smuggling corpus over raw
//! sockets (at `RUST_LOG=trace`, the log then grepped for every secret), `kill -9` loops under
//! load on SQLite and PostgreSQL, and a PostgreSQL outage longer than the key cache's freshness
//! under load. Every wait is on an explicit signal (responses counted, rows counted); timeouts
//! are failure guards only.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, Db, Gateway, MockUpstream, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The upstream credential of every account here: it must never appear in a log.
const CREDENTIAL: &str = "sk-upstream-fault-suite-credential-never-logged";

/// Longest any one exchange or wait may take before it counts as a hang (a failure guard).
const GUARD: Duration = Duration::from_secs(20);

/// A mock that answers 200 with the chat fixture and names, in `x-mock-path`, the request it
/// received: a response carrying it was forwarded, one without it was tollgate's own.
async fn echo_upstream() -> MockUpstream {
    let body = fixture("chat_completion.json");
    MockUpstream::start(move |rec| {
        Reply::Status(
            200,
            vec![
                ("content-type", "application/json".into()),
                ("x-mock-path", rec.path.clone()),
            ],
            body.clone(),
        )
    })
    .await
}

/// Asserts that no secret of the run is in the gateway's log.
fn assert_no_secret_logged(gw: &Gateway, keys: &[String]) {
    let log = gw.log();
    assert!(
        !log.contains(CREDENTIAL),
        "the upstream credential is logged"
    );
    for key in keys {
        assert!(!log.contains(key.as_str()), "a client key is logged");
        // Also the random part alone (a log could strip the prefix or cut the checksum).
        assert!(!log.contains(&key[3..25]), "part of a client key is logged");
    }
}

// ---------------------------------------------------------------- the smuggling corpus

/// One HTTP/1 response read back from the raw socket.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path the mock received, when this response was forwarded from it.
    fn forwarded(&self) -> Option<&str> {
        self.header("x-mock-path")
    }
}

/// Splits what the gateway sent into responses (Content-Length, chunked or close-delimited
/// bodies). `Err` names bytes that are not a well-formed response.
fn parse_responses(mut b: &[u8]) -> Result<Vec<Resp>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("unterminated head: {:?}", String::from_utf8_lossy(b)))?;
        let head = String::from_utf8_lossy(&b[..end]).into_owned();
        b = &b[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let resp = Resp { status, headers };
        if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let line_end = b
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .ok_or("unterminated chunk size")?;
                let size_text = String::from_utf8_lossy(&b[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or(""), 16)
                    .map_err(|_| format!("bad chunk size {size_text:?}"))?;
                b = &b[line_end + 2..];
                if size == 0 {
                    b = b
                        .strip_prefix(b"\r\n")
                        .ok_or("no CRLF after the last chunk")?;
                    break;
                }
                if b.len() < size + 2 {
                    return Err("truncated chunk".into());
                }
                b = &b[size + 2..];
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(|_| format!("bad length {len:?}"))?;
            if b.len() < len {
                return Err("truncated body".into());
            }
            b = &b[len..];
        } else if !(resp.status == 204 || resp.status == 304 || resp.status < 200) {
            b = &[]; // close-delimited
        }
        out.push(resp);
    }
    Ok(out)
}

/// Writes `bytes` on a new connection, half-closes it (so nothing waits on bytes that will not
/// come) and reads until the gateway closes. `None`: not closed within [`GUARD`] (a hang).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = conn.write_all(bytes).await; // the gateway may close before reading it all
    let _ = conn.shutdown().await;
    let mut out = Vec::new();
    match tokio::time::timeout(GUARD, conn.read_to_end(&mut out)).await {
        Ok(_) => Some(out), // EOF, or a reset after what was read
        Err(_) => None,
    }
}

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// One 4xx from tollgate itself, then the connection closes; nothing forwarded.
    Refused,
    /// These paths forwarded, each answered as its own response in this order, then the close.
    Served(&'static [&'static str]),
    /// Bare-LF line endings: 400 + close, or closed without an answer; never forwarded.
    NeverForwarded,
}

const CHAT: &str = "/v1/chat/completions";
const SMUGGLED: &str = "/v1/smuggled";

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

/// Builds the corpus. Case `i` carries `?c=i` on every request line, so the mock's records are
/// attributed to their case although the cases run concurrently. `S` is a request smuggled after
/// the first one; it asks to close, so a gateway that answers it then closes.
fn corpus(key: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut check = |name: &'static str, make: &dyn Fn(&str, &str) -> Vec<u8>, expect| {
        let c = format!("c={}", cases.len());
        let s = format!(
            "GET {SMUGGLED}?{c} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\nconnection: close\r\n\r\n"
        );
        cases.push(Case {
            name,
            bytes: make(&c, &s),
            expect,
        });
    };
    let p =
        |c: &str| format!("POST {CHAT}?{c} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n");
    let cat = |parts: &[&str]| parts.concat().into_bytes();

    // Content-Length and Transfer-Encoding together: pingora drops the length (RFC 9112 §6.3)
    // and turns keep-alive off (§6.1): served by the chunked framing, then closed unanswered.
    check(
        "cl_and_te",
        &|c, s| {
            cat(&[
                &p(c),
                "content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT]),
    );
    // CL.TE: the length covers the smuggled request, the chunked body ends before it.
    check(
        "cl_te_length_covers_smuggled",
        &|c, s| {
            let body = format!("0\r\n\r\n{s}");
            cat(&[
                &p(c),
                &format!("content-length: {}\r\n", body.len()),
                "transfer-encoding: chunked\r\n\r\n",
                &body,
            ])
        },
        Expect::Served(&[CHAT]),
    );
    // TE.CL: the chunked body is longer than the length.
    check(
        "te_cl_length_short",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT]),
    );
    check(
        "te_identity_chunked",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: identity, chunked\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "te_chunked_identity",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "te_obs_fold",
        &|c, s| cat(&[&p(c), "transfer-encoding:\r\n chunked\r\n\r\n0\r\n\r\n", s]),
        Expect::Refused,
    );
    check(
        "te_line_starting_with_space",
        &|c, s| cat(&[&p(c), " transfer-encoding: chunked\r\n\r\n0\r\n\r\n", s]),
        Expect::Refused,
    );
    // Optional whitespace around a value is no ambiguity: a chunked body, then S on its own.
    check(
        "te_value_leading_spaces",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding:    chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "te_value_tab",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding:\tchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "te_value_vertical_tab",
        &|c, s| cat(&[&p(c), "transfer-encoding: \x0bchunked\r\n\r\n0\r\n\r\n", s]),
        Expect::Refused,
    );
    check(
        "te_space_before_colon",
        &|c, s| cat(&[&p(c), "transfer-encoding : chunked\r\n\r\n0\r\n\r\n", s]),
        Expect::Refused,
    );
    check(
        "te_xchunked",
        &|c, s| cat(&[&p(c), "transfer-encoding: xchunked\r\n\r\n0\r\n\r\n", s]),
        Expect::Refused,
    );
    check(
        "te_chunked_twice_two_lines",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "te_chunked_twice_one_line",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "te_on_http_1_0",
        &|c, s| {
            cat(&[
                &p(c).replacen("HTTP/1.1", "HTTP/1.0", 1),
                "transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "cl_duplicate_differing",
        &|c, s| cat(&[&p(c), "content-length: 2\r\ncontent-length: 3\r\n\r\n{}", s]),
        Expect::Refused,
    );
    // Identical duplicates are one length (RFC 9110 §8.6).
    check(
        "cl_duplicate_equal",
        &|c, s| cat(&[&p(c), "content-length: 2\r\ncontent-length: 2\r\n\r\n{}", s]),
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "cl_list_differing",
        &|c, s| cat(&[&p(c), "content-length: 2, 40\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "cl_plus_sign",
        &|c, s| cat(&[&p(c), "content-length: +2\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "cl_negative",
        &|c, s| cat(&[&p(c), "content-length: -1\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "cl_hex",
        &|c, s| cat(&[&p(c), "content-length: 0x2\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "cl_inner_space",
        &|c, s| cat(&[&p(c), "content-length: 2 0\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "cl_overflow",
        &|c, s| {
            cat(&[
                &p(c),
                "content-length: 99999999999999999999999\r\n\r\n{}",
                s,
            ])
        },
        Expect::Refused,
    );
    // A zero length and a request in the same write: pipelining, each answered in order.
    check(
        "cl_zero_then_request",
        &|c, s| cat(&[&p(c), "content-length: 0\r\n\r\n", s]),
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "chunk_extension",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\n2;ext=\"v\"\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "chunk_size_overflow",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\nfffffffffffffffff2\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "chunk_size_0x",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "chunk_lines_lf_only",
        &|c, s| cat(&[&p(c), "transfer-encoding: chunked\r\n\r\n2\n{}\n0\n\n", s]),
        Expect::Refused,
    );
    check(
        "chunk_lines_cr_only",
        &|c, s| cat(&[&p(c), "transfer-encoding: chunked\r\n\r\n2\r{}\r0\r\r", s]),
        Expect::Refused,
    );
    check(
        "chunk_data_longer_than_size",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n",
                s,
            ])
        },
        Expect::Refused,
    );
    // Trailers are discarded unparsed: a malformed one ends at the blank line, and S is its own
    // request, answered in order.
    check(
        "chunked_bad_trailer_then_request",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nnot a trailer\r\n\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    // No blank line after the last chunk: S's lines are read as trailers, never as a request.
    check(
        "chunked_unterminated_then_request",
        &|c, s| {
            cat(&[
                &p(c),
                "transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n",
                s,
            ])
        },
        Expect::Served(&[CHAT]),
    );
    check(
        "header_with_nul",
        &|c, s| cat(&[&p(c), "x-a: a\0b\r\ncontent-length: 2\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "header_name_with_space",
        &|c, s| cat(&[&p(c), "x a: b\r\ncontent-length: 2\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "header_cr_only",
        &|c, s| {
            cat(&[
                &p(c),
                "x-a: b\rtransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::Refused,
    );
    check(
        "duplicate_host",
        &|c, s| cat(&[&p(c), "host: u\r\ncontent-length: 2\r\n\r\n{}", s]),
        Expect::Refused,
    );
    check(
        "absolute_form_other_host",
        &|c, s| {
            cat(&[
                &p(c).replacen(CHAT, &format!("http://evil.example{CHAT}"), 1),
                "content-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::Refused,
    );
    // Absolute form naming its own Host: served, but to the account's host (checked below).
    check(
        "absolute_form_matching_host",
        &|c, s| {
            cat(&[
                &p(c)
                    .replacen(CHAT, &format!("http://evil.example{CHAT}"), 1)
                    .replacen("host: t", "host: evil.example", 1),
                "content-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "http_1_0_keep_alive_with_length",
        &|c, s| {
            cat(&[
                &p(c).replacen("HTTP/1.1", "HTTP/1.0", 1),
                "connection: keep-alive\r\ncontent-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    check(
        "get_with_body",
        &|c, s| {
            cat(&[
                &p(c).replacen("POST", "GET", 1),
                "content-length: 5\r\n\r\nhello",
                s,
            ])
        },
        Expect::Served(&[CHAT, SMUGGLED]),
    );
    // Bare LF line endings (RFC 9112 §2.2 lets a server accept them; tollgate refuses them, a
    // change landing separately): never forwarded.
    check(
        "bare_lf_request_line",
        &|c, s| {
            cat(&[
                &p(c).replacen(" HTTP/1.1\r\n", " HTTP/1.1\n", 1),
                "content-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::NeverForwarded,
    );
    check(
        "bare_lf_everywhere",
        &|c, s| {
            cat(&[&p(c), "content-length: 2\r\n\r\n{}", s])
                .iter()
                .copied()
                .filter(|&b| b != b'\r')
                .collect()
        },
        Expect::NeverForwarded,
    );
    check(
        "bare_lf_hiding_a_header",
        &|c, s| {
            cat(&[
                &p(c),
                "x-a: b\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n{}",
                s,
            ])
        },
        Expect::NeverForwarded,
    );
    cases
}

/// What is wrong with one case's exchange (empty: as expected).
fn judge(case: &Case, got: Option<Vec<u8>>, mock_paths: &[String]) -> Vec<String> {
    let mut wrong = Vec::new();
    let Some(bytes) = got else {
        return vec![format!("HANG: not closed within {GUARD:?}")];
    };
    let responses = match parse_responses(&bytes) {
        Ok(r) => r,
        Err(e) => return vec![format!("unparseable answer ({e}): {bytes:?}")],
    };
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    let forwarded: Vec<&str> = responses.iter().filter_map(Resp::forwarded).collect();
    // Every case: the upstream saw exactly the requests whose answers came back, in order.
    if forwarded != mock_paths {
        wrong.push(format!(
            "SMUGGLED: the upstream saw {mock_paths:?}, the client got answers for {forwarded:?}"
        ));
    }
    if let Some(i) = statuses.iter().position(|&s| s >= 400) {
        if i + 1 != statuses.len() {
            wrong.push(format!(
                "answered after an error, on the same connection: {statuses:?}"
            ));
        }
    }
    let strip = |p: &str| p.split('?').next().unwrap_or("").to_string();
    match case.expect {
        Expect::Refused => {
            if !(statuses.len() == 1 && (400..500).contains(&statuses[0]) && forwarded.is_empty()) {
                wrong.push(format!("expected one 4xx then close, got {statuses:?}"));
            }
        }
        Expect::Served(paths) => {
            let got: Vec<String> = forwarded.iter().map(|p| strip(p)).collect();
            if got != paths || statuses.iter().any(|&s| s != 200) {
                wrong.push(format!(
                    "expected {paths:?} each served in order, got statuses {statuses:?} for {got:?}"
                ));
            }
        }
        Expect::NeverForwarded => {
            if !forwarded.is_empty() || !(statuses.is_empty() || statuses == [400]) {
                wrong.push(format!(
                    "FORWARDED or not refused: statuses {statuses:?}, forwarded {forwarded:?}"
                ));
            }
        }
    }
    wrong
}

/// Every case of the corpus, concurrently, each on its own connection with a valid key, against
/// a gateway logging at trace level; then the log holds no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_never_reaches_the_upstream() {
    let mock = echo_upstream().await;
    let mut gw = Gateway::new(Db::Sqlite, "", "").await.unwrap();
    gw.rust_log = "trace".into();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), CREDENTIAL, 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let cases = corpus(&key);
    let answers =
        futures_util::future::join_all(cases.iter().map(|c| exchange(gw.addr, &c.bytes))).await;

    let recorded = mock.recorded();
    let mut by_case: HashMap<String, Vec<String>> = HashMap::new();
    for r in &recorded {
        let case = r
            .path
            .split_once('?')
            .map_or("", |(_, q)| q)
            .split('&')
            .find(|kv| kv.starts_with("c="))
            .unwrap_or("c=?")
            .to_string();
        by_case.entry(case).or_default().push(r.path.clone());
    }
    let mut failures = Vec::new();
    for (i, (case, got)) in cases.iter().zip(answers).enumerate() {
        let seen = by_case.remove(&format!("c={i}")).unwrap_or_default();
        let statuses: Vec<u16> = got
            .as_deref()
            .and_then(|b| parse_responses(b).ok())
            .map(|r| r.iter().map(|r| r.status).collect())
            .unwrap_or_default();
        eprintln!(
            "{:>2} {:<34} {statuses:?}, {} forwarded",
            i,
            case.name,
            seen.len()
        );
        for what in judge(case, got, &seen) {
            failures.push(format!("{} (c={i}): {what}", case.name));
        }
    }
    assert!(
        by_case.is_empty(),
        "requests reached the upstream that no case sent: {by_case:?}"
    );
    // The absolute form's host goes nowhere: every forwarded request went to the account's host.
    for r in &recorded {
        let host = r.headers.get("host").and_then(|h| h.to_str().ok());
        assert_eq!(host, Some(mock.addr.to_string().as_str()), "{}", r.path);
    }
    assert!(gw.terminate().success(), "{}", gw.log());
    let log = gw.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level is on"
    );
    assert_no_secret_logged(&gw, &[key]);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------- load with a kill switch

/// A response the client received whole with a 2xx: the gateway owes it a row.
struct Acked {
    id: String,
    at: Instant,
}

/// Clients sending until stopped, counting whole 2xx responses on a watch channel.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Requests that failed (status or transport), with when.
    failed: Arc<Mutex<Vec<(Instant, String)>>>,
    sent: Arc<AtomicUsize>,
    done: watch::Receiver<usize>,
    /// When the first response was acknowledged.
    first: Arc<Mutex<Option<Instant>>>,
    /// The slowest acknowledged request, in microseconds.
    slowest_us: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, keys: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let failed: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let (tx, done) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let first: Arc<Mutex<Option<Instant>>> = Arc::default();
        let slowest_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let http = reqwest::Client::builder().timeout(GUARD).build().unwrap();
        let tasks = (0..clients)
            .map(|i| {
                let (first, slowest_us) = (first.clone(), slowest_us.clone());
                let (stop, acked, failed, sent, tx, http, url) = (
                    stop.clone(),
                    acked.clone(),
                    failed.clone(),
                    sent.clone(),
                    tx.clone(),
                    http.clone(),
                    url.clone(),
                );
                let key = keys[i % keys.len()].clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        sent.fetch_add(1, Ordering::SeqCst);
                        let started = Instant::now();
                        let r = http.post(&url).bearer_auth(&key).body("{}").send().await;
                        let outcome = match r {
                            Ok(r) if r.status().is_success() => {
                                let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
                                r.bytes().await.map(|_| id).map_err(|e| e.to_string())
                            }
                            Ok(r) => Err(format!("status {}", r.status())),
                            Err(e) => Err(e.to_string()),
                        };
                        match outcome {
                            Ok(id) => {
                                let at = Instant::now();
                                first.lock().unwrap().get_or_insert(at);
                                let took = (at - started).as_micros() as u64;
                                slowest_us.fetch_max(took, Ordering::SeqCst);
                                acked.lock().unwrap().push(Acked { id, at });
                                tx.send_modify(|n| *n += 1);
                            }
                            Err(e) => {
                                failed.lock().unwrap().push((Instant::now(), e));
                                // The gateway is gone (or failing): this client stops.
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            failed,
            sent,
            done,
            first,
            slowest_us,
            tasks,
        }
    }

    /// Waits until `n` responses in all were acknowledged (a guard fails a stall).
    async fn until(&mut self, n: usize, what: &str) {
        tokio::time::timeout(GUARD, self.done.wait_for(|&d| d >= n))
            .await
            .unwrap_or_else(|_| panic!("{what}: fewer than {n} responses within {GUARD:?}"))
            .unwrap();
    }

    fn count(&self) -> usize {
        *self.done.borrow()
    }

    /// Waits, response by response, until the first acknowledged response is `age` old.
    async fn until_first_is(&mut self, age: Duration) {
        loop {
            if let Some(first) = *self.first.lock().unwrap() {
                if first.elapsed() >= age {
                    return;
                }
            }
            let next = self.count() + 1;
            self.until(next, "load").await;
        }
    }

    fn slowest(&self) -> Duration {
        Duration::from_micros(self.slowest_us.load(Ordering::SeqCst))
    }

    async fn stop(self) -> (Vec<Acked>, Vec<(Instant, String)>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (acked, failed, self.sent.load(Ordering::SeqCst))
    }
}

/// Replaces the harness's 50 ms flush interval with `lines` (must include `flush_interval_ms`).
fn set_writer_lines(gw: &Gateway, lines: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert!(text.contains("flush_interval_ms = 50\n"));
    std::fs::write(
        &gw.config,
        text.replacen("flush_interval_ms = 50\n", &format!("{lines}\n"), 1),
    )
    .unwrap();
}

const FLUSH_INTERVAL_MS: u64 = 200;
const FLUSH_TIMEOUT_MS: u64 = 500;

both_dbs!(
    kill_9_under_load_loses_at_most_the_unflushed_window,
    kill_loops
);
/// Sixteen clients send while the gateway is SIGKILLed three times, each time once a given
/// number of responses came back, and restarted on the same database and spool. ARCHITECTURE.md:
/// "SIGKILL loses at most the rows queued in memory and not yet flushed: ≤ flush_interval_ms of
/// traffic or one batch_size, plus one batch mid-write (≤ flush_timeout_ms)". So a row may be
/// missing only for a response completed within `flush_interval_ms + flush_timeout_ms` before
/// its kill; nothing is duplicated; a graceful last run loses nothing. (Records queued during a
/// write start the next batch with its interval counted from when that write began —
/// `Writer::next_deadline` — so none waits a write, then a whole interval, then its own write.)
/// What a starved CPU may add to the writer's own bound (a loaded machine, not the writer).
const SCHEDULING_SLACK: Duration = Duration::from_millis(500);

async fn kill_loops(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    set_writer_lines(
        &gw,
        &format!("flush_interval_ms = {FLUSH_INTERVAL_MS}\nflush_timeout_ms = {FLUSH_TIMEOUT_MS}"),
    );
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), CREDENTIAL, 1, 1);
    let keys: Vec<String> = (0..4)
        .map(|_| gw.create_key("alice@example.com", &[]))
        .collect();
    let window = Duration::from_millis(FLUSH_INTERVAL_MS + FLUSH_TIMEOUT_MS);
    // The bound is the writer's logic; on a loaded 2-core machine (this file's other tests run
    // beside it) its task can also wait for a CPU. Rows older than this are never lost.
    let bound = window + SCHEDULING_SLACK;

    // (acked responses, kill instant) per killed run.
    let mut runs: Vec<(Vec<Acked>, Instant)> = Vec::new();
    let mut sent_total = 0;
    for (round, kill_after) in [250usize, 700, 400].into_iter().enumerate() {
        gw.start().await; // replays what the last crash left in the spool
        let mut load = Load::start(gw.url("/v1/chat/completions"), &keys, 16);
        // Killed once `kill_after` responses came back and the load has run for twice the
        // window, so rows older than the window exist and must have survived.
        load.until(kill_after, "before the kill").await;
        load.until_first_is(2 * window).await;
        let killed_at = Instant::now();
        gw.kill9();
        let (acked, failed, sent) = load.stop().await;
        sent_total += sent;
        for (at, why) in &failed {
            assert!(
                *at >= killed_at,
                "round {round}: a request failed while the gateway was up: {why}"
            );
        }
        eprintln!(
            "round {round}: killed after {} responses ({} sent)",
            acked.len(),
            sent
        );
        runs.push((acked, killed_at));
    }
    // A last run, ended gracefully: it replays the spool and loses nothing of its own.
    gw.start().await;
    let mut load = Load::start(gw.url("/v1/chat/completions"), &keys, 16);
    load.until(300, "the graceful run").await;
    let (last, failed, sent) = load.stop().await;
    sent_total += sent;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(gw.terminate().success(), "{}", gw.log());

    let rows = gw.db.rows().await;
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a request id twice in usage_records");
    assert!(
        rows.len() <= sent_total,
        "{} rows for {sent_total} requests",
        rows.len()
    );
    for a in &last {
        assert!(ids.contains(a.id.as_str()), "graceful run lost {}", a.id);
    }
    for (round, (acked, killed_at)) in runs.iter().enumerate() {
        let lost: Vec<&Acked> = acked
            .iter()
            .filter(|a| !ids.contains(a.id.as_str()))
            .collect();
        let oldest = lost
            .iter()
            .map(|a| killed_at.saturating_duration_since(a.at))
            .max()
            .unwrap_or_default();
        eprintln!(
            "round {round}: {} of {} acknowledged rows lost, the oldest acknowledged {oldest:?} before the kill",
            lost.len(),
            acked.len()
        );
        assert!(
            acked
                .iter()
                .any(|a| killed_at.saturating_duration_since(a.at) > window),
            "round {round}: no response older than the window: the bound was not exercised"
        );
        assert!(
            oldest <= bound,
            "round {round}: a row acknowledged {oldest:?} before the kill is lost (bound {window:?} + {SCHEDULING_SLACK:?} for scheduling)"
        );
    }
    let report = gw.db.invariants().await;
    assert!(report.holds(), "{report:?}");
    assert_eq!(common::spooled_records(&gw.spool_dir()), 0);
    assert_no_secret_logged(&gw, &keys);
}

// ---------------------------------------------------------------- PostgreSQL outage under load

const CACHE_TTL_SECS: u64 = 1;

/// Eight clients over four keys keep sending while the TCP cutter keeps PostgreSQL away for three
/// times the key cache's freshness: every request is served (2xx, none waits on the database),
/// the writer spools, and after the restore every acknowledged row arrives exactly once while
/// the gateway still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_longer_than_the_cache_ttl_under_load() {
    if common::postgres_base_url().is_none() {
        eprintln!("skipped: TEST_DATABASE_URL is not set");
        return;
    }
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        Db::Postgres,
        "",
        &format!("[auth]\ncache_ttl_secs = {CACHE_TTL_SECS}\nmax_stale_secs = 3600\n"),
    )
    .await
    .unwrap();
    gw.set_writer("flush_timeout_ms = 1000\nmax_backoff_ms = 500");
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), CREDENTIAL, 1, 1);
    let keys: Vec<String> = (0..4)
        .map(|_| gw.create_key("alice@example.com", &[]))
        .collect();
    let cutter = gw.through_cutter().await;
    gw.start().await;

    let mut load = Load::start(gw.url("/v1/chat/completions"), &keys, 8);
    load.until(200, "before the outage").await; // every key seen, cached
    cutter.cut();
    let cut_at = Instant::now();
    let before = load.count();
    // The outage lasts three freshness periods and at least 300 responses, whichever is later.
    let outage = Duration::from_secs(3 * CACHE_TTL_SECS);
    while cut_at.elapsed() < outage || load.count() < before + 300 {
        let next = load.count() + 1;
        load.until(next, "during the outage").await;
    }
    let during = load.count() - before;
    // The writer could not reach the database: the outage's rows wait in the spool.
    let spooled_at = Instant::now();
    while common::spooled_records(&gw.spool_dir()) == 0 {
        assert!(
            spooled_at.elapsed() < GUARD,
            "nothing spooled: {}",
            gw.log()
        );
        let next = load.count() + 1;
        load.until(next, "while waiting for the spool").await;
    }
    cutter.restore();
    let restored = load.count();
    load.until(restored + 200, "after the restore").await;
    let slowest = load.slowest();
    let (acked, failed, _) = load.stop().await;
    assert!(
        failed.is_empty(),
        "requests failed during the outage: {failed:?}"
    );

    // Rows arrive while the gateway runs (spool replay), each once.
    let waiting = Instant::now();
    loop {
        let n = gw.db.scalar("SELECT COUNT(*) FROM usage_records").await as usize;
        assert!(n <= acked.len(), "{n} rows for {} requests", acked.len());
        if n == acked.len() {
            break;
        }
        assert!(
            waiting.elapsed() < GUARD,
            "{n} of {} rows after the restore: {}",
            acked.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval, not a sync point
    }
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(rows.len(), acked.len(), "every served request once");
    assert_eq!(ids.len(), rows.len());
    assert!(acked.iter().all(|a| ids.contains(a.id.as_str())));
    assert!(gw.db.invariants().await.holds());
    assert_eq!(common::spooled_records(&gw.spool_dir()), 0);
    eprintln!(
        "outage: {during} responses in {:?} without the database, {} in all, the slowest {slowest:?}",
        outage,
        acked.len()
    );
    assert_no_secret_logged(&gw, &keys);
}
