//! A sorted set of tickets by score, as Redis keeps one (`ZADD`, `ZSCORE`, `ZRANGEBYSCORE`):
//! the memory store keeps the line in the same shapes as the Lua scripts, so that the two
//! read alike and expiring what is due costs only what is due.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub(crate) struct Sorted {
    scores: HashMap<u64, u64>,
    by_score: BTreeSet<(u64, u64)>,
}

impl Sorted {
    /// Set `member`'s score (`ZADD`).
    pub fn add(&mut self, member: u64, score: u64) {
        if let Some(old) = self.scores.insert(member, score) {
            self.by_score.remove(&(old, member));
        }
        self.by_score.insert((score, member));
    }

    /// Raise `member`'s score to `score`, or add it (`ZADD GT`): a late report never moves a
    /// time back.
    pub fn raise(&mut self, member: u64, score: u64) {
        if self.score(member).is_none_or(|old| old < score) {
            self.add(member, score);
        }
    }

    pub fn remove(&mut self, member: u64) -> Option<u64> {
        let score = self.scores.remove(&member)?;
        self.by_score.remove(&(score, member));
        Some(score)
    }

    pub fn score(&self, member: u64) -> Option<u64> {
        self.scores.get(&member).copied()
    }

    pub fn contains(&self, member: u64) -> bool {
        self.scores.contains_key(&member)
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// How many members are scored above `low` and at or below `high` (`ZCOUNT (low high`):
    /// linear in how many are at or below `high`.
    pub fn count_between(&self, low: Option<u64>, high: u64) -> usize {
        self.by_score.iter().take_while(|(s, _)| *s <= high).filter(|(s, _)| low.is_none_or(|low| *s > low)).count()
    }

    /// Remove and return up to `most` members scored at or below `score`, lowest first.
    pub fn pop_until(&mut self, score: u64, most: usize) -> Vec<(u64, u64)> {
        let due: Vec<(u64, u64)> = self.by_score.iter().take_while(|(s, _)| *s <= score).take(most).copied().collect();
        for (score, member) in &due {
            self.by_score.remove(&(*score, *member));
            self.scores.remove(member);
        }
        due.into_iter().map(|(score, member)| (member, score)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_kept_by_score() {
        let mut set = Sorted::default();
        set.add(7, 30);
        set.add(8, 10);
        set.add(9, 20);
        set.add(7, 5); // moved down
        set.raise(8, 1); // a lower score is ignored
        set.raise(10, 25);
        assert_eq!((set.len(), set.score(7), set.score(8)), (4, Some(5), Some(10)));
        assert_eq!((set.count_between(None, 20), set.count_between(Some(5), 25)), (3, 3));
        assert_eq!(set.pop_until(20, 2), [(7, 5), (8, 10)]);
        assert_eq!(set.pop_until(20, 10), [(9, 20)]);
        assert_eq!(set.remove(10), Some(25));
        assert_eq!((set.len(), set.contains(10)), (0, false));
    }
}
