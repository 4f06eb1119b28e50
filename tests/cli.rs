//! The command line: `check`, `keygen`, `token`.

mod common;

use std::process::{Command, Output};

use common::TempDir;

fn vestibule(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vestibule")).args(args).current_dir(dir).output().expect("vestibule runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:3000"
[tokens]
signing_key = "keys/signing.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 600
max_active = 500
"#;

#[test]
fn keygen_check_and_token_work_together() {
    let dir = TempDir::new("cli");
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    for alg in ["eddsa", "es256", "hs256"] {
        let key = vestibule(&["keygen", "--alg", alg], dir.path());
        assert!(key.status.success(), "{}", text(&key.stderr));
        std::fs::write(dir.path().join("keys/signing.pem"), &key.stdout).unwrap();
        std::fs::write(dir.path().join("proxy.toml"), CONFIG).unwrap();

        let check = vestibule(&["check", "--config", "proxy.toml"], dir.path());
        assert!(check.status.success(), "{alg}: {}", text(&check.stderr));
        assert!(text(&check.stdout).contains("ok (1 rooms)"));

        let token =
            vestibule(&["token", "--config", "proxy.toml", "--room", "checkout", "--visitor", "v9"], dir.path());
        assert!(token.status.success(), "{}", text(&token.stderr));
        let token = text(&token.stdout);
        assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    }
    let pem = text(&vestibule(&["keygen"], dir.path()).stdout);
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
}

#[test]
fn check_names_the_file_the_key_and_the_problem() {
    let dir = TempDir::new("cli-check");
    let cases = [
        (CONFIG.replace("admit_per_minute = 600", "admit_per_minute = -1"), "rooms[0].admit_per_minute"),
        (CONFIG.replace("[tokens]", "[tokens]\nsurprise = 1"), "tokens.surprise: unknown field"),
        (CONFIG.replace("http://127.0.0.1:3000", "ftp://x"), "upstream.url"),
        (CONFIG.replace("\"127.0.0.1:0\"", "\"not an address\""), "server.listen"),
        (CONFIG.to_owned(), "keys/signing.pem: cannot read"),
    ];
    for (config, expected) in cases {
        std::fs::write(dir.path().join("bad.toml"), &config).unwrap();
        let output = vestibule(&["check", "--config", "bad.toml"], dir.path());
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
        if !expected.contains("signing.pem") {
            assert!(stderr.contains("bad.toml: "), "the file is named: {stderr}");
        }
    }
}
