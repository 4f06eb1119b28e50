//! The waiting page in the visitor's language: the bundled translations
//! (`languages.toml`), `Accept-Language` negotiation (RFC 9110 quality values, RFC 4647
//! lookup down to the primary subtag), a room's fixed `lang`, and the operator's own words
//! (`strings`) over the bundled ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

/// The language used when nothing the visitor accepts is bundled.
pub const DEFAULT: &str = "en";
/// Most `Accept-Language` entries looked at: a hostile header costs bounded work.
const MAX_ENTRIES: usize = 32;

/// One bundled language.
#[derive(Debug)]
pub struct Language {
    pub code: String,
    /// Its own name for itself ("Français").
    pub name: String,
    /// Laid out right to left.
    pub rtl: bool,
    pub strings: BTreeMap<String, String>,
}

/// Every bundled language, English first.
pub fn bundled() -> &'static [Language] {
    static LANGUAGES: OnceLock<Vec<Language>> = OnceLock::new();
    LANGUAGES.get_or_init(|| {
        let table: toml::Table = toml::from_str(include_str!("languages.toml")).expect("languages.toml parses");
        let mut languages: Vec<Language> = table
            .into_iter()
            .map(|(code, entries)| {
                let mut strings: BTreeMap<String, String> = entries
                    .as_table()
                    .expect("each language is a table")
                    .iter()
                    .map(|(key, value)| (key.clone(), value.as_str().expect("strings").to_owned()))
                    .collect();
                let name = strings.remove("name").expect("each language names itself");
                let rtl = strings.remove("dir").is_some_and(|dir| dir == "rtl");
                Language { code, name, rtl, strings }
            })
            .collect();
        languages.sort_by_key(|language| language.code != DEFAULT);
        languages
    })
}

/// The bundled language `code` (lower case, as in `languages.toml`).
pub fn find(code: &str) -> Option<&'static Language> {
    bundled().iter().find(|language| language.code == code)
}

/// The language to answer in, from an `Accept-Language` header: the bundled one the visitor
/// prefers (highest quality first, in the order given for equal ones; `fr-CA` matches `fr`;
/// `q=0` refuses; `*` takes the default), or the default.
pub fn negotiate(accept_language: Option<&str>) -> &'static Language {
    let default = find(DEFAULT).expect("English is bundled");
    let Some(header) = accept_language else { return default };
    let mut ranges: Vec<(String, f32)> = header
        .split(',')
        .take(MAX_ENTRIES)
        .filter_map(|entry| {
            let mut parts = entry.split(';');
            let tag = parts.next()?.trim().to_ascii_lowercase();
            let mut quality = 1.0;
            for parameter in parts {
                let (name, value) = parameter.split_once('=')?;
                if name.trim().eq_ignore_ascii_case("q") {
                    quality = value.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q))?;
                }
            }
            (!tag.is_empty()).then_some((tag, quality))
        })
        .collect();
    // Stable: equal qualities keep the visitor's order.
    ranges.sort_by(|a, b| b.1.total_cmp(&a.1));
    let refused: Vec<&str> = ranges.iter().filter(|(_, q)| *q == 0.0).map(|(tag, _)| tag.as_str()).collect();
    for (tag, quality) in &ranges {
        if *quality == 0.0 {
            break;
        }
        if tag == "*" {
            return bundled().iter().find(|l| !refused.contains(&l.code.as_str())).unwrap_or(default);
        }
        // Lookup: the whole tag, then shorter and shorter prefixes (`zh-hant-tw`, `zh-hant`, `zh`).
        let mut candidate = tag.as_str();
        loop {
            if let Some(language) = find(candidate) {
                return language;
            }
            match candidate.rfind('-') {
                Some(cut) => candidate = &candidate[..cut],
                None => break,
            }
        }
    }
    default
}

/// The words a page is written in: a language, with the room's own words over its bundled
/// ones.
#[derive(Debug, Clone)]
pub struct Words {
    pub code: &'static str,
    pub rtl: bool,
    pub strings: BTreeMap<String, String>,
}

impl Words {
    /// The words for a visitor of a room: the room's fixed `lang`, or the one negotiated from
    /// `accept_language`; then the room's `strings` for that language.
    pub fn for_visitor(
        fixed: Option<&str>,
        overrides: &HashMap<String, HashMap<String, String>>,
        accept_language: Option<&str>,
    ) -> Words {
        let language = fixed.and_then(find).unwrap_or_else(|| negotiate(accept_language));
        let mut strings = language.strings.clone();
        if let Some(own) = overrides.get(&language.code) {
            strings.extend(own.iter().map(|(key, value)| (key.clone(), value.clone())));
        }
        Words { code: &language.code, rtl: language.rtl, strings }
    }

    /// The string `key` (every bundled language has every key).
    pub fn get(&self, key: &str) -> &str {
        self.strings.get(key).map_or("", String::as_str)
    }

    /// The estimated wait in words.
    pub fn eta(&self, eta_seconds: Option<u64>) -> String {
        match eta_seconds {
            None => self.get("eta_estimating").to_owned(),
            Some(s) if s < 60 => self.get("eta_soon").to_owned(),
            Some(s) if s < 3_600 => match (s as f64 / 60.0).round() as u64 {
                1 => self.get("eta_one_minute").to_owned(),
                minutes => self.get("eta_minutes").replace("{n}", &minutes.to_string()),
            },
            Some(_) => self.get("eta_long").to_owned(),
        }
    }
}

/// What is wrong with a room's `lang` and `strings`, as (key, problem).
pub fn check(
    fixed: Option<&str>,
    overrides: &HashMap<String, HashMap<String, String>>,
) -> Result<(), (String, String)> {
    let codes = || bundled().iter().map(|l| l.code.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(code) = fixed {
        if find(code).is_none() {
            return Err(("lang".into(), format!("not a bundled language: one of {}", codes())));
        }
    }
    let keys = &find(DEFAULT).expect("English is bundled").strings;
    for (code, strings) in overrides {
        if find(code).is_none() {
            return Err((format!("strings.{code}"), format!("not a bundled language: one of {}", codes())));
        }
        for (key, value) in strings {
            if !keys.contains_key(key) {
                let known: Vec<&str> = keys.keys().map(String::as_str).collect();
                return Err((
                    format!("strings.{code}.{key}"),
                    format!("not a string of the page: one of {}", known.join(", ")),
                ));
            }
            if value.len() > 500 {
                return Err((format!("strings.{code}.{key}"), "at most 500 bytes".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(header: &str) -> &'static str {
        &negotiate(Some(header)).code
    }

    #[test]
    fn at_least_ten_languages_one_right_to_left_each_with_every_string() {
        let languages = bundled();
        assert!(languages.len() >= 10, "{}", languages.len());
        assert_eq!(languages[0].code, "en");
        assert!(languages.iter().any(|l| l.rtl));
        let keys: Vec<&String> = languages[0].strings.keys().collect();
        for language in languages {
            let theirs: Vec<&String> = language.strings.keys().collect();
            assert_eq!(theirs, keys, "{} has not the same strings as en", language.code);
            assert!(language.strings["eta_minutes"].contains("{n}"), "{}", language.code);
            assert!(language.strings.values().all(|s| !s.trim().is_empty()), "{}", language.code);
        }
    }

    #[test]
    fn quality_values_order_and_fallbacks_decide() {
        assert_eq!(negotiate(None).code, "en");
        assert_eq!(code("fr"), "fr");
        assert_eq!(code("fr-CA,fr;q=0.9,en;q=0.8"), "fr", "a regional tag falls back to its language");
        assert_eq!(code("da, de;q=0.9, en;q=0.8"), "de", "the first bundled one, by quality");
        assert_eq!(code("en;q=0.5, ja"), "ja", "quality wins over order");
        assert_eq!(code("nl;q=0.7, pl;q=0.7"), "nl", "equal quality: the visitor's order");
        assert_eq!(code("xx, yy"), "en", "nothing bundled: the default");
        assert_eq!(code("zh-Hant-TW"), "zh", "lookup down to the primary subtag");
        assert_eq!(code("AR-eg"), "ar", "case does not matter");
        assert_eq!(code("*"), "en");
        assert_eq!(code("en;q=0, *"), "ar", "q=0 refuses; * takes the first bundled one not refused");
        assert_eq!(code("de;q=2, it;q=abc, es"), "es", "bad quality values are ignored");
        // A long header costs bounded work: what comes after the first 32 entries is not read.
        assert_eq!(code(&format!("{}fr", "xx,".repeat(31))), "fr");
        assert_eq!(code(&format!("{}fr", "xx,".repeat(32))), "en");
    }

    #[test]
    fn a_fixed_language_and_the_operators_words_win() {
        let overrides: HashMap<String, HashMap<String, String>> =
            [("fr".into(), [("title_full".into(), "Complet !".into())].into())].into();
        let words = Words::for_visitor(Some("fr"), &overrides, Some("de"));
        assert_eq!((words.code, words.get("title_full")), ("fr", "Complet !"));
        assert_eq!(words.get("title_waiting"), "Vous êtes dans la file");
        let german = Words::for_visitor(None, &overrides, Some("de"));
        assert_eq!(german.get("title_full"), "Die Warteschlange ist voll");
        assert_eq!(german.eta(Some(300)), "Noch etwa 5 Minuten.");
        assert_eq!(german.eta(Some(60)), "Noch etwa 1 Minute.");
        assert!(Words::for_visitor(None, &overrides, Some("ar")).rtl);
        assert!(check(Some("xx"), &HashMap::new()).is_err());
        let unknown: HashMap<String, HashMap<String, String>> =
            [("fr".into(), [("title_fulll".into(), "x".into())].into())].into();
        assert_eq!(check(None, &unknown).unwrap_err().0, "strings.fr.title_fulll");
    }
}
