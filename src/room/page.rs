//! The waiting page, rendered on the server (minijinja) from the room's snapshot.

use std::sync::OnceLock;

use minijinja::{context, Environment};

use crate::line::Gone;
use crate::room::Status;

const TEMPLATE: &str = include_str!("waiting.html");
const CHALLENGE: &str = include_str!("challenge.html");

fn environment() -> &'static Environment<'static> {
    static ENVIRONMENT: OnceLock<Environment<'static>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let mut environment = Environment::new();
        // `.html` templates are auto-escaped: room messages cannot inject markup.
        environment.add_template("waiting.html", TEMPLATE).expect("the waiting page template parses");
        environment.add_template("challenge.html", CHALLENGE).expect("the challenge page template parses");
        environment
    })
}

/// The page that solves a room's proof of work in the browser, stores the solution in the
/// cookie `cookie`, and loads the page again.
pub fn render_challenge(challenge: &str, difficulty: u8, cookie: &str) -> String {
    let page = environment().get_template("challenge.html").expect("the template was added");
    page.render(context! { challenge, difficulty, cookie })
        .unwrap_or_else(|error| format!("<!doctype html><title>One moment</title><p>Please reload. ({error})</p>"))
}

/// Why a visitor is back at the end of the line, in their words.
pub fn why(gone: Gone) -> Option<&'static str> {
    match gone {
        Gone::Lapsed => Some("Your turn came while this page was closed, so you have joined the line again."),
        Gone::Left => Some("You were away for a while and lost your place, so you have joined the line again."),
        Gone::Used => Some("That place in line was already used, so you have joined the line again."),
        Gone::Unknown => None,
    }
}

/// The page for a visitor at `status`, who joined at `start_position`; `site_name` ends the
/// tab's title.
pub fn render(room: &str, site_name: Option<&str>, status: &Status, start_position: u64, why: Option<&str>) -> String {
    let position = status.position.unwrap_or(0);
    let progress = if start_position > 0 {
        (100.0 * (1.0 - position as f64 / start_position as f64)).clamp(0.0, 100.0).round() as u64
    } else {
        0
    };
    let eta_text = match status.eta_seconds {
        None => "Estimating your wait…".to_owned(),
        Some(s) if s < 60 => "Less than a minute to go.".to_owned(),
        Some(s) if s < 3_600 => {
            let minutes = (s as f64 / 60.0).round() as u64;
            format!("About {minutes} minute{} to go.", if minutes == 1 { "" } else { "s" })
        }
        Some(_) => "More than an hour to go.".to_owned(),
    };
    let page = environment().get_template("waiting.html").expect("the template was added");
    page.render(context! {
        room,
        site_name,
        status => status.status,
        position,
        start_position => start_position.max(position),
        progress,
        eta_text,
        message => status.message.as_deref(),
        why,
    })
    .unwrap_or_else(|error| format!("<!doctype html><title>In line</title><p>You are in line. ({error})</p>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(position: u64, eta: Option<u64>, message: Option<&str>) -> Status {
        Status { status: "waiting", position: Some(position), eta_seconds: eta, message: message.map(str::to_owned) }
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
    fn messages_are_escaped() {
        let html = render("checkout", None, &waiting(1, None, Some("<script>alert(1)</script>")), 1, None);
        assert!(!html.contains("<script>alert(1)</script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("Estimating your wait"));
    }

    #[test]
    fn a_returning_visitor_is_told_why() {
        let html = render("checkout", None, &waiting(9, None, None), 9, why(Gone::Lapsed));
        assert!(html.contains("joined the line again"));
    }
}
