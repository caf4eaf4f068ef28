//! The official `openai` and `anthropic` Python SDKs (installed from PyPI by `.ci/run`) against a
//! live gateway in front of a mock provider: every call works, usage chunks reach the client
//! exactly when it asked, and every refusal raises the SDK's own exception with tollgate's
//! message. The checks themselves are `tests/sdk/check_sdks.py`; this starts what they need and
//! then checks the rows they left.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::{fixture, Db, Gateway, MockUpstream, Reply};

const CONFIG: &str = r#"
[[routes]]
prefix = "/v1/messages"
type = "anthropic"

[[routes]]
prefix = "/v1/"
type = "openai"

[[routes]]
prefix = "/v2/"
type = "generic"

[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"

[prices."claude-3-5-sonnet"]
input = "3"
output = "15"
"#;

fn sse(body: Bytes) -> Reply {
    Reply::Status(
        200,
        vec![("content-type", "text/event-stream".into())],
        body,
    )
}

/// A provider speaking OpenAI chat/responses/embeddings and Anthropic messages.
async fn provider() -> MockUpstream {
    MockUpstream::start(|req| {
        let stream = String::from_utf8_lossy(&req.body).contains("\"stream\":true");
        match (req.path.as_str(), stream) {
            ("/v1/chat/completions", true) => {
                let mut s = fixture("chat_stream_1.sse").to_vec();
                s.extend_from_slice(&fixture("chat_stream_2.sse"));
                sse(s.into())
            }
            ("/v1/chat/completions", false) => {
                Reply::Json(200, fixture("chat_completion_cached.json"))
            }
            ("/v1/responses", true) => sse(fixture("responses_stream.sse")),
            ("/v1/responses", false) => Reply::Json(200, fixture("responses.json")),
            ("/v1/embeddings", _) => Reply::Json(
                200,
                Bytes::from_static(
                    br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":2,"total_tokens":2}}"#,
                ),
            ),
            ("/v1/messages", true) => sse(fixture("anthropic_stream.sse")),
            ("/v1/messages", false) => Reply::Json(200, fixture("anthropic_message.json")),
            _ => Reply::Json(404, Bytes::from_static(br#"{"error":{"message":"no"}}"#)),
        }
    })
    .await
}

fn sdks_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_work_against_a_live_gateway() {
    if !sdks_installed() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the openai and anthropic Python SDKs are not installed in CI"
        );
        eprintln!("skipped: pip install openai anthropic");
        return;
    }
    let mock = provider().await;
    let mut gw = Gateway::new(Db::Sqlite, "max_body_bytes = 65536", CONFIG)
        .await
        .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("openai", "openai", &mock.url(), "sk-o", 1, 1);
    gw.add_account("anthropic", "anthropic", &mock.url(), "sk-a", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    let chat_only = gw.create_key(
        "alice@example.com",
        &["--permissions", r#"["/v1/chat/completions"]"#],
    );
    let unknown = tollgate::keys::generate().unwrap();
    // A prepaid user whose balance covers nothing: refused 429 insufficient_quota.
    gw.add_user("broke@example.com");
    let broke = gw.create_key("broke@example.com", &[]);
    gw.grant("broke@example.com", "0.0000000001");
    gw.start().await;

    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/check_sdks.py"
        ))
        .env("TOLLGATE_URL", gw.url(""))
        .env("TOLLGATE_KEY", &key)
        .env("TOLLGATE_CHAT_ONLY_KEY", &chat_only)
        .env("TOLLGATE_UNKNOWN_KEY", &unknown)
        .env("TOLLGATE_BROKE_KEY", &broke)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");

    // What the SDKs did is metered: every served call has its tokens, no client key upstream.
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let served: Vec<_> = rows.iter().filter(|r| r.status_code == 200).collect();
    assert_eq!(served.len(), 8, "{rows:?}");
    assert!(served.iter().all(|r| r.tokens_used > 0), "{served:?}");
    // The out-of-credit calls: one row each, not retried by the SDKs.
    let quota: Vec<_> = rows.iter().filter(|r| r.status_code == 429).collect();
    assert_eq!(quota.len(), 2, "{quota:?}");
    for r in mock.recorded() {
        let auth = format!("{:?}", r.headers);
        assert!(!auth.contains(&key) && !auth.contains(&chat_only));
    }
}
