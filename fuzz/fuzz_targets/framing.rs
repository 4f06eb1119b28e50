//! The framing scanner: never panics, however the stream is cut, and a stream cut in two
//! different ways gives the same verdicts (it judges the bytes, not how they arrived).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vestibule::framing::{Scanner, Verdict, Verdicts};

fn verdicts(stream: &[u8], cut: usize) -> Vec<Verdict> {
    let verdicts = Verdicts::default();
    let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
    for piece in stream.chunks(cut.max(1)) {
        scanner.feed(piece);
    }
    let mut seen = Vec::new();
    loop {
        match verdicts.next() {
            Verdict::Unknown => break,
            verdict => seen.push(verdict),
        }
    }
    seen
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    assert_eq!(verdicts(stream, usize::from(cut)), verdicts(stream, stream.len()));
});
