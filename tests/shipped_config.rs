//! The shipped `proxy.toml` is the documentation of every key: it must parse, its commented
//! defaults must be real keys, and every key the code accepts must appear in it.

use std::path::Path;

use vestibule::config::Config;

const SHIPPED_AS_IS: &str = include_str!("../proxy.toml");
/// The shipped file with the one change an operator must make: an admin token of their own.
static SHIPPED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| SHIPPED_AS_IS.replace("change-me-please", "an-operators-own-secret"));

#[test]
fn shipped_config_parses() {
    let config = Config::parse(&SHIPPED, "proxy.toml", Path::new(".")).unwrap();
    assert_eq!(config.rooms[0].id, "checkout");
    assert_eq!(config.server.listen.port(), 8080);
}

#[test]
fn the_shipped_example_admin_token_is_refused() {
    let error = Config::parse(SHIPPED_AS_IS, "proxy.toml", Path::new(".")).unwrap_err();
    assert_eq!(error.key, "admin.token");
    assert!(error.to_string().contains("example token"), "{error}");
    // From the environment too.
    let text = SHIPPED.replace("token = \"an-operators-own-secret\"", "token_env = \"VESTIBULE_TEST_EXAMPLE_TOKEN\"");
    std::env::set_var("VESTIBULE_TEST_EXAMPLE_TOKEN", "change-me-please");
    let mut config = Config::parse(&text, "proxy.toml", Path::new(".")).expect("check does not read the variable");
    let error = config.resolve_secrets().unwrap_err();
    assert_eq!(error.key, "admin.token_env");
    assert!(error.to_string().contains("VESTIBULE_TEST_EXAMPLE_TOKEN is the example token"), "{error}");
}

#[test]
fn every_commented_key_is_a_real_key() {
    // Uncomment `# key = value` lines (all but the alternative to `token`).
    let uncommented: String = SHIPPED
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_assignment(rest) && !rest.starts_with("token_env") => rest.to_owned(),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented.contains("\nworkers = 2"), "the uncommenting works");
    Config::parse(&uncommented, "proxy.toml (uncommented)", Path::new(".")).unwrap();
}

#[test]
fn every_accepted_key_is_documented() {
    let sections = ["[server]", "[admin]", "[upstream]", "[store]", "[tokens]", "[[rooms]]", "[log]"];
    for section in sections {
        let probe = SHIPPED.replacen(section, &format!("{section}\nzz_not_a_key = 1"), 1);
        let error = Config::parse(&probe, "proxy.toml", Path::new(".")).unwrap_err().to_string();
        // serde lists the accepted keys: "expected one of `a`, `b`" or "expected `a` or `b`".
        let expected = error.split("expected").nth(1).unwrap_or_else(|| panic!("{section}: {error}"));
        let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(!keys.is_empty(), "{error}");
        for key in keys {
            let documented = SHIPPED.lines().any(|line| line.trim_start_matches("# ").starts_with(&format!("{key} =")));
            assert!(documented, "{section} {key} is accepted but not documented in proxy.toml");
        }
    }
}

fn is_assignment(text: &str) -> bool {
    let Some((key, _)) = text.split_once(" = ") else { return false };
    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}
