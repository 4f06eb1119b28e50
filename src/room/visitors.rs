//! What the gate asks a room for a visitor: redeem a ticket, join the line, take or present a
//! pre-queue number, renew a session. Each is one call to the store; the line the answer
//! belongs to is learned here, the one place it is.

use super::*;
use crate::line::{Joined, Prequeued, Redeemed};

impl Room {
    /// Redeem `ticket`: its turn (a session), its place, or gone.
    pub async fn redeem(&self, store: &Store, ticket: u64, now: u64) -> Result<Redeemed, StoreError> {
        store.redeem(&self.id, &self.limits(), ticket, now, self.absence(now)).await
    }

    /// Join the line (straight in when `admit_now` and nobody waits and there is room), with
    /// a proof of work taken once if the room asks for one. The answer, and the line it is of.
    pub async fn join(
        &self,
        store: &Store,
        admit_now: bool,
        now: u64,
        proof: Option<u128>,
    ) -> Result<(Joined, u64), StoreError> {
        let joined = store.join_with_proof(&self.id, &self.limits(), admit_now, now, proof).await?;
        if !matches!(joined, Joined::Full) {
            self.metrics.joins.inc();
            // The line is not empty any more: if this instance leads, its next step advances.
            self.wake();
        }
        if matches!(joined, Joined::Admitted { .. }) {
            self.metrics.admissions.inc();
        }
        Ok((joined, self.learn_line(store)))
    }

    /// Take a pre-queue number of `event` (`number` 0), or present one; the answer, and the
    /// line it is of.
    pub async fn prequeue(
        &self,
        store: &Store,
        event: u64,
        number: u64,
        now: u64,
        proof: Option<u128>,
    ) -> Result<(Prequeued, u64), StoreError> {
        let prequeued = store.prequeue(&self.id, &self.limits(), event, number, now, proof).await?;
        if number == 0 && matches!(prequeued, Prequeued::Number(_)) {
            self.metrics.joins.inc();
        }
        Ok((prequeued, self.learn_line(store)))
    }

    /// Extend the session of `ticket` to `until`; false when it ended meanwhile.
    pub async fn renew(&self, store: &Store, ticket: u64, until: u64, now: u64) -> Result<bool, StoreError> {
        store.renew(&self.id, &self.limits(), ticket, until, now).await
    }

    /// The line the store keeps for this room now, learned.
    pub fn learn_line(&self, store: &Store) -> u64 {
        let line = store.line(&self.id);
        self.observe_line(line);
        line
    }
}
