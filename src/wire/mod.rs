//! What the server and its clients (the waiting page, apps, `vestibule loadtest`) both rely
//! on, in one small module that imports nothing of the server: cookie names, the scheduler's
//! step, and the published rule a sale's draw follows.

pub mod shuffle;

use std::time::Duration;

/// How often a room's scheduler grants turns: two visitors whose turns came within one step
/// of each other are in order.
pub const STEP: Duration = Duration::from_millis(100);

/// The name of the cookie that carries a room's admission token.
pub fn token_cookie(room: &str) -> String {
    format!("vestibule-token-{room}")
}

/// The name of the cookie that carries a room's signed ticket (a place in line).
pub fn ticket_cookie(room: &str) -> String {
    format!("vestibule-ticket-{room}")
}

/// The name of the cookie the waiting page puts a solved proof of work in.
pub fn proof_cookie(room: &str) -> String {
    format!("vestibule-pow-{room}")
}
