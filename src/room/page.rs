//! The waiting page, rendered on the server (minijinja) from the room's snapshot: the bundled
//! template, or a room's own (`template = "waiting.html"`), checked when the configuration
//! is read (a syntax error, an unknown variable or filter is refused with the file and line)
//! and compiled once per load or reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use minijinja::{context, Environment, UndefinedBehavior, Value};

use crate::line::Gone;
use crate::room::lang::Words;
use crate::room::Status;

const TEMPLATE: &str = include_str!("waiting.html");
const SCRIPT: &str = include_str!("script.html");
const CHALLENGE: &str = include_str!("challenge.html");

fn challenge_environment() -> &'static Environment<'static> {
    static ENVIRONMENT: OnceLock<Environment<'static>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let mut environment = Environment::new();
        environment.add_template("challenge.html", CHALLENGE).expect("the challenge page template parses");
        environment
    })
}

/// The page that solves a room's proof of work in the browser, stores the solution in the
/// cookie `cookie`, and loads the page again.
pub fn render_challenge(challenge: &str, difficulty: u8, cookie: &str) -> String {
    let page = challenge_environment().get_template("challenge.html").expect("the template was added");
    page.render(context! { challenge, difficulty, cookie })
        .unwrap_or_else(|error| format!("<!doctype html><title>One moment</title><p>Please reload. ({error})</p>"))
}

/// Why a visitor is back at the end of the line: the key of its words.
fn why_key(gone: Gone) -> Option<&'static str> {
    match gone {
        Gone::Lapsed => Some("why_lapsed"),
        Gone::Left => Some("why_left"),
        Gone::Used => Some("why_used"),
        Gone::Unknown => None,
    }
}

/// A room's waiting page: its template compiled, with the live script beside it.
pub struct WaitingPage {
    environment: Environment<'static>,
    /// The operator's file, or `None` for the bundled page.
    path: Option<PathBuf>,
    /// A digest of the file, so that a reload tells a changed template from the same one.
    digest: u64,
}

/// The same file with the same text: a reload that finds it leaves the room as it is.
impl PartialEq for WaitingPage {
    fn eq(&self, other: &WaitingPage) -> bool {
        self.path == other.path && self.digest == other.digest
    }
}

impl std::fmt::Debug for WaitingPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingPage").field("path", &self.path).field("digest", &self.digest).finish()
    }
}

/// What a page shows: one visitor's place, or a sample for the admin preview.
#[derive(Debug, Clone)]
pub struct Shown<'a> {
    pub room: &'a str,
    pub site_name: Option<&'a str>,
    /// The room's title ("Spring sale").
    pub title: Option<&'a str>,
    pub status: &'a Status,
    pub start_position: u64,
    /// Why a returning visitor is at the end of the line again.
    pub why: Option<Gone>,
    /// The words of the visitor's language.
    pub words: &'a Words,
}

impl WaitingPage {
    fn with(source: String, path: Option<PathBuf>) -> Result<WaitingPage, minijinja::Error> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        source.hash(&mut hasher);
        let mut environment = Environment::new();
        // An operator's typo (`{{ postion }}`) is an error when the file is checked, not an
        // empty place on the page.
        environment.set_undefined_behavior(UndefinedBehavior::Strict);
        // `.html` templates are auto-escaped: room messages cannot inject markup.
        environment.add_template("script.html", SCRIPT)?;
        environment.add_template_owned("waiting.html", source)?;
        Ok(WaitingPage { environment, path, digest: hasher.finish() })
    }

    /// The bundled page.
    pub fn bundled() -> Arc<WaitingPage> {
        static BUNDLED: OnceLock<Arc<WaitingPage>> = OnceLock::new();
        BUNDLED
            .get_or_init(|| Arc::new(WaitingPage::with(TEMPLATE.to_owned(), None).expect("the bundled page parses")))
            .clone()
    }

    /// An operator's template at `path`: read, compiled, and rendered once in every state
    /// with sample values, so that what would fail for a visitor fails now. The error names
    /// the file and the line.
    pub fn load(path: &Path) -> Result<WaitingPage, String> {
        let source =
            std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let page = WaitingPage::with(source, Some(path.to_owned())).map_err(|error| describe(&error, path))?;
        // Every language, every state, with every optional value set and with none set (no
        // site name, no message, no reason, no estimate yet).
        for language in crate::room::lang::bundled() {
            let words = Words::for_visitor(Some(&language.code), &Default::default(), None);
            for state in PREVIEW_STATES {
                for full in [true, false] {
                    let mut status = sample_status(state, None);
                    if !full {
                        status.message = None;
                        status.eta_seconds = None;
                        status.starts_in = status.starts_in.map(|_| 0);
                    }
                    let (site_name, title, why) =
                        if full { (Some("Shop"), Some("Sale"), Some(Gone::Lapsed)) } else { (None, None, None) };
                    let shown = Shown {
                        room: "room",
                        site_name,
                        title,
                        status: &status,
                        start_position: 40,
                        why,
                        words: &words,
                    };
                    page.try_render(&shown).map_err(|error| describe(&error, path))?;
                }
            }
        }
        Ok(page)
    }

    fn try_render(&self, shown: &Shown<'_>) -> Result<String, minijinja::Error> {
        let status = shown.status;
        let position = status.position.unwrap_or(0);
        let start_position = shown.start_position.max(position);
        let progress = if start_position > 0 {
            (100.0 * (1.0 - position as f64 / start_position as f64)).clamp(0.0, 100.0).round() as u64
        } else {
            0
        };
        let suffix = shown.site_name.map(|name| format!(" - {name}")).unwrap_or_default();
        let words = shown.words;
        let context = context! {
            lang => words.code,
            dir => if words.rtl { "rtl" } else { "ltr" },
            t => &words.strings,
            room => shown.room,
            site_name => shown.site_name,
            title => shown.title,
            suffix,
            status => status.status,
            position,
            start_position,
            progress,
            eta_seconds => status.eta_seconds,
            eta_text => words.eta(status.eta_seconds),
            starts_in => status.starts_in,
            starts_text => status.starts_in.map(countdown),
            // The store away, the room open: the pause in the visitor's words.
            message => status.message.as_deref().or_else(|| {
                (status.reason == Some("store") && position > 0).then(|| words.get("paused_text"))
            }),
            why => shown.why.and_then(why_key).map(|key| words.get(key)),
        };
        let script = self.environment.get_template("script.html")?.render(&context)?;
        let context = context! { script => Value::from_safe_string(script), ..context };
        self.environment.get_template("waiting.html")?.render(context)
    }

    /// The page for `shown`; a template that fails now (it rendered at check time) says so
    /// in a plain page that still holds the place.
    pub fn render(&self, shown: &Shown<'_>) -> String {
        self.try_render(shown).unwrap_or_else(|error| {
            tracing::error!(path = ?self.path, error = %error, "the waiting page template failed");
            "<!doctype html><title>In line</title><meta http-equiv=\"refresh\" content=\"20\"><p>You are in line. This page refreshes itself.</p>".to_owned()
        })
    }
}

/// The states an operator's template is checked (and previewed) in.
pub const PREVIEW_STATES: [&str; 5] = ["waiting", "paused", "closed", "full", "prequeue"];

/// Seconds as a countdown: `12:05`, `1:02:05`.
pub fn countdown(seconds: u64) -> String {
    let (hours, minutes, seconds) = (seconds / 3_600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}:{minutes:02}:{seconds:02}")
    } else {
        format!("{minutes}:{seconds:02}")
    }
}

/// A sample status for the preview and the check: place 12 of 40, four minutes to go.
pub fn sample_status(state: &str, message: Option<String>) -> Status {
    let placed = matches!(state, "waiting" | "paused");
    let status = PREVIEW_STATES.iter().find(|s| **s == state).copied().unwrap_or("waiting");
    Status {
        status,
        position: placed.then_some(12),
        eta_seconds: placed.then_some(240),
        message: message.or_else(|| Some("A sample message from the operator.".to_owned())),
        reason: None,
        starts_in: (status == "prequeue").then_some(754),
        number: (status == "prequeue").then_some(1_234),
    }
}

/// A template error as an operator reads it: file, line, what.
fn describe(error: &minijinja::Error, path: &Path) -> String {
    let what = error.detail().map_or_else(|| error.kind().to_string(), |detail| format!("{}: {detail}", error.kind()));
    match error.line() {
        Some(line) => format!("{}, line {line}: {what}", path.display()),
        None => format!("{}: {what}", path.display()),
    }
}

/// The page for a visitor at `status` with the bundled template, in English (tests).
#[cfg(test)]
fn render(room: &str, site_name: Option<&str>, status: &Status, start_position: u64, why: Option<Gone>) -> String {
    let words = Words::for_visitor(None, &Default::default(), None);
    WaitingPage::bundled().render(&Shown { room, site_name, title: None, status, start_position, why, words: &words })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(position: u64, eta: Option<u64>, message: Option<&str>) -> Status {
        Status {
            status: "waiting",
            position: Some(position),
            eta_seconds: eta,
            message: message.map(str::to_owned),
            reason: None,
            starts_in: None,
            number: None,
        }
    }

    /// The store away, the room open: a waiter's page says the pause in their language, and
    /// the live script words a `reason: store` pause the same way.
    #[test]
    fn a_pause_for_the_store_is_worded_in_the_visitors_language() {
        let words = Words::for_visitor(None, &Default::default(), Some("fr"));
        let status = Status { status: "paused", reason: Some("store"), ..waiting(7, None, None) };
        let shown = Shown {
            room: "checkout",
            site_name: None,
            title: None,
            status: &status,
            start_position: 9,
            why: None,
            words: &words,
        };
        let html = WaitingPage::bundled().render(&shown);
        assert!(html.contains(">La file est en pause un instant. Vous gardez votre place.</p>"), "{html}");
        assert!(html.contains(r#"m.reason === "store" ? t.paused_text"#));
        // An operator's own message wins.
        let status = Status { message: Some("Retour à midi".into()), ..status };
        let html = WaitingPage::bundled().render(&Shown { status: &status, ..shown });
        assert!(html.contains(">Retour à midi</p>") && !html.contains(">La file est en pause un instant"), "{html}");
    }

    #[test]
    fn the_page_shows_place_wait_progress_and_message_without_external_assets() {
        let html = render("checkout", Some("Shop"), &waiting(42, Some(150), Some("Sale ends at 6")), 84, None);
        assert!(html.contains(r#"<p class="place" id="position">42</p>"#));
        assert!(html.contains("About 3 minutes to go."));
        assert!(html.contains("width: 50%"));
        assert!(html.contains("Sale ends at 6"));
        assert!(html.contains("<title>(42) In line - Shop</title>"), "the tab shows the place and the site");
        assert!(html.contains(r#"aria-live="polite""#));
        assert!(html.contains(r#"<meta http-equiv="refresh" content="20">"#));
        assert!(html.contains(r#"/_vestibule/ws?room="#));
        assert!(!html.contains("src=") && !html.contains("href="), "no external assets");
    }

    #[test]
    fn the_page_names_the_site_and_the_room_and_speaks_the_visitors_language() {
        let words = Words::for_visitor(None, &Default::default(), Some("de-AT, en;q=0.5"));
        let status = waiting(3, Some(200), None);
        let shown = Shown {
            room: "checkout",
            site_name: Some("Shop"),
            title: Some("Spring sale"),
            status: &status,
            start_position: 12,
            why: Some(Gone::Left),
            words: &words,
        };
        let html = WaitingPage::bundled().render(&shown);
        assert!(html.contains("Shop · Spring sale"), "{html}");
        assert!(html.contains(r#"<html lang="de" dir="ltr">"#));
        assert!(html.contains("<title>(3) In der Schlange - Shop</title>"));
        assert!(html.contains("Noch etwa 3 Minuten."));
        assert!(html.contains("haben Ihren Platz verloren"));
        assert!(html.contains("width: 75%"), "9 of the 12 places ahead are behind them");
    }

    #[test]
    fn messages_are_escaped() {
        let html = render("checkout", None, &waiting(1, None, Some("<script>alert(1)</script>")), 1, None);
        assert!(!html.contains("<script>alert(1)</script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("Estimating your wait"));
    }

    #[test]
    fn a_returning_visitor_is_told_why() {
        let html = render("checkout", None, &waiting(9, None, None), 9, Some(Gone::Lapsed));
        assert!(html.contains("joined the line again"));
    }
}
