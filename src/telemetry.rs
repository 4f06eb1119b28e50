//! Tracing set-up: human-readable text or one JSON object per line.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Install the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(&log.level)));
    // Colour only for a terminal, and not when NO_COLOR asks (no-color.org): a log redirected
    // to a file or a journal gets no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second call (tests, `demo` after `check`) keeps the first subscriber.
    drop(installed);
}

/// The filter for `log.level`. rustls logs at WARN what a client's handshake did oddly (an IP
/// address sent as the server name, as wrk does): one line per connection that any client can
/// cause, so it is kept to errors unless the level names rustls itself.
fn directives(level: &str) -> String {
    if level.contains("rustls") || level.trim() == "off" {
        level.to_owned()
    } else {
        format!("{level},rustls=error")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_cannot_fill_the_log_through_rustls_warnings() {
        assert_eq!(super::directives("info"), "info,rustls=error");
        assert_eq!(super::directives("debug,rustls=debug"), "debug,rustls=debug");
        assert_eq!(super::directives("off"), "off");
    }
}
