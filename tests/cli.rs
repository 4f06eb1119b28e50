//! The command line: `check`, `keygen`, `token`; what `check` says it loaded and warns of,
//! and each command asking only for what it uses.

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
        // What it loaded: the key's type and kid, the store, the room and its paths.
        let said = text(&check.stdout);
        let kind = match alg {
            "eddsa" => "EdDSA key",
            "es256" => "ES256 key",
            _ => "HS256 key",
        };
        assert!(said.starts_with("proxy.toml: ok\n"), "{said}");
        assert!(said.contains(&format!("tokens.signing_key: {kind} ")) && said.contains(", kid "), "{said}");
        assert!(said.contains("store: memory"), "{said}");
        assert!(said.contains("room checkout: guards /checkout; 600 a minute, at most 500 at once"), "{said}");
        // An HS256 secret is legal, but the upstream cannot verify with it: said.
        assert_eq!(text(&check.stderr).contains("HS256 secret"), alg == "hs256", "{}", text(&check.stderr));

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
        (
            CONFIG.to_owned(),
            "bad.toml: tokens.signing_key = \"keys/signing.pem\": cannot read it: No such file or directory \
             (os error 2); make one with `vestibule keygen --out keys/signing.pem`",
        ),
        (
            CONFIG.replace("[tokens]", "[store]\nkind = \"redis\"\nurl = \"127.0.0.1:6379\"\n[tokens]"),
            "bad.toml: store.url: not a Redis URL",
        ),
        (
            CONFIG.replace("keys/signing.pem", "notes.txt"),
            "bad.toml: tokens.signing_key = \"notes.txt\": not a key: neither a PEM key nor an HS256 secret",
        ),
    ];
    std::fs::write(dir.path().join("notes.txt"), "Our signing key is kept in the vault, ask Sam for it.\n").unwrap();
    for (config, expected) in cases {
        std::fs::write(dir.path().join("bad.toml"), &config).unwrap();
        let output = vestibule(&["check", "--config", "bad.toml"], dir.path());
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
        assert!(stderr.contains("bad.toml: "), "the file is named: {stderr}");
        assert!(stderr.matches("os error").count() <= 1, "the cause once: {stderr}");
    }
}

/// A config a first-time operator might write: a path with a trailing slash, the admin token
/// in a variable this shell does not have.
fn operator_config(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let key = vestibule(&["keygen", "--out", "keys/signing.pem"], dir);
    assert!(key.status.success(), "{}", text(&key.stderr));
    CONFIG
        .replace("[\"/checkout\"]", "[\"/checkout/\"]")
        .replace("[upstream]", "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"VESTIBULE_TEST_NOT_SET\"\n[upstream]")
}

#[test]
fn check_warns_of_what_is_legal_but_likely_wrong() {
    let dir = TempDir::new("cli-warn");
    std::fs::write(dir.path().join("proxy.toml"), operator_config(dir.path())).unwrap();
    let check = vestibule(&["check"], dir.path());
    assert!(check.status.success(), "{}", text(&check.stderr));
    let warnings = text(&check.stderr);
    assert!(
        warnings.contains("rooms[0].paths[0] = \"/checkout/\" ends with '/': it guards /checkout too"),
        "{warnings}"
    );
    assert!(warnings.contains("admin.token_env: VESTIBULE_TEST_NOT_SET is not set here; `run` needs it"), "{warnings}");
}

/// `check` and `token` do not need the admin token; `run` does, and says which key and why.
#[test]
fn commands_ask_only_for_what_they_use() {
    let dir = TempDir::new("cli-ask");
    std::fs::write(dir.path().join("proxy.toml"), operator_config(dir.path())).unwrap();
    let token = vestibule(&["token", "--room", "checkout"], dir.path());
    assert!(token.status.success(), "{}", text(&token.stderr));
    let run = vestibule(&["run"], dir.path());
    assert!(!run.status.success());
    let said = text(&run.stderr);
    assert!(
        said.contains("proxy.toml: admin.token_env: environment variable VESTIBULE_TEST_NOT_SET is not set"),
        "{said}"
    );
    // A value too short is the variable's fault, and said so.
    let run = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .arg("run")
        .current_dir(dir.path())
        .env("VESTIBULE_TEST_NOT_SET", "short")
        .output()
        .unwrap();
    let said = text(&run.stderr);
    assert!(said.contains("admin.token_env: the value of VESTIBULE_TEST_NOT_SET is too short"), "{said}");
    // Set in the shell check runs in: checked as run checks it.
    let check = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .arg("check")
        .current_dir(dir.path())
        .env("VESTIBULE_TEST_NOT_SET", "short")
        .output()
        .unwrap();
    assert!(!check.status.success());
    let said = text(&check.stderr);
    assert!(said.contains("proxy.toml: admin.token_env: the value of VESTIBULE_TEST_NOT_SET is too short"), "{said}");
}

/// `keygen > file`, as a shell with umask 022 runs it, leaves the key to its owner alone.
#[test]
fn a_key_written_through_the_shell_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("cli-keygen");
    let script = format!(
        "umask 022 && {:?} keygen > key.pem && {:?} keygen | cat > piped.pem",
        env!("CARGO_BIN_EXE_vestibule"),
        env!("CARGO_BIN_EXE_vestibule")
    );
    let status = Command::new("bash").arg("-c").arg(script).current_dir(dir.path()).status().unwrap();
    assert!(status.success());
    let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.pem"), 0o600);
    // Through a pipe vestibule cannot know the file: the shell's mode stays (the README
    // uses --out, which makes its file 0600).
    assert_eq!(mode("piped.pem"), 0o644);
    assert!(std::fs::read_to_string(dir.path().join("key.pem")).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    // --out makes the folders it needs, as the error for a missing key suggests it.
    let out = vestibule(&["keygen", "--out", "keys/new/ed25519.pem"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode("keys/new/ed25519.pem"), 0o600);
}
