//! The README's quickstart, run as written: its `sh` block, against a running gateway whose
//! upstream is a mock provider (the two places that name the real provider and the default port
//! are the only substitutions), from a directory laid out like a checkout after the first command.

mod common;

use std::process::Command;

use common::{Db, Gateway, MockUpstream, BIN};

/// The first ```sh block after `## Quickstart`.
fn quickstart() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Quickstart").expect("a Quickstart section")..];
    let start = section.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let end = start + section[start..].find("```").unwrap();
    section[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_runs_as_pasted() {
    let script = quickstart();
    assert!(script.contains("https://api.openai.com") && script.contains("127.0.0.1:8080"));
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(Db::Sqlite, "", "").await.unwrap();
    gw.start().await;
    let script = script
        .replace("https://api.openai.com", &mock.url())
        .replace("127.0.0.1:8080", &gw.addr.to_string());
    // The checkout: config.toml (the gateway's) and target/release/tollgate.
    let release = gw.dir.path().join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(BIN, release.join("tollgate")).unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(gw.dir.path())
        .env("OPENAI_API_KEY", "sk-quickstart")
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("TOLLGATE_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    assert!(
        stdout.contains("\"usage\""),
        "the completion reached the terminal: {stdout}"
    );
    let seen = mock.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], "Bearer sk-quickstart");
}
