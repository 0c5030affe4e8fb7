//! The configuration reference, rendered two ways from one source: the commented config
//! `distill init` writes, and docs/configuration.md. Each key's name and type come from
//! the config types (`schema`), its default from `Config::default()` as the resolved
//! config writes it, its range and meaning from `keys::DOCS`.

use super::keys::{doc_for, KeyDoc};
use super::schema::{self, Kind};
use super::Config;
use crate::error::{Error, Result};

/// How to regenerate docs/configuration.md after changing a config type or its docs.
pub const REGENERATE: &str = "DISTILL_WRITE_DOCS=1 cargo test -p distill --test config_reference";

/// One key with everything the reference says about it.
pub struct Entry {
    /// Dotted path, e.g. `student.train.lr`.
    pub key: String,
    pub kind: Kind,
    /// May be left unset (absent from the resolved config).
    pub optional: bool,
    /// The default as TOML; None for an unset optional key.
    pub default: Option<toml::Value>,
    pub doc: &'static KeyDoc,
}

impl Entry {
    /// The table the key lives in (`student.train`) and its name in it (`lr`).
    pub fn section_and_name(&self) -> (&str, &str) {
        self.key.rsplit_once('.').unwrap_or(("", &self.key))
    }
}

/// Every key of the config types, in declaration order, with its documentation. A key
/// without an entry in `keys::DOCS` is an error naming it.
pub fn entries() -> Result<Vec<Entry>> {
    let defaults = toml::Value::try_from(Config::default())
        .map_err(|e| Error::Invalid(format!("cannot write the default config as TOML: {e}")))?;
    let mut out = Vec::new();
    for f in schema::fields::<Config>().map_err(|e| Error::Invalid(e.to_string()))? {
        let doc = doc_for(&f.key).ok_or_else(|| {
            Error::Invalid(format!(
                "config key `{}` has no documentation; add it to crates/distill/src/config/keys.rs \
                 and regenerate docs/configuration.md ({REGENERATE})",
                f.key
            ))
        })?;
        let default = f.key.split('.').try_fold(&defaults, |v, part| v.get(part)).cloned();
        out.push(Entry {
            key: f.key,
            kind: f.kind,
            optional: f.optional,
            default,
            doc,
        });
    }
    Ok(out)
}

/// The entries grouped by table, tables in order of first appearance.
fn sections(entries: &[Entry]) -> Vec<(&str, Vec<&Entry>)> {
    let mut out: Vec<(&str, Vec<&Entry>)> = Vec::new();
    for e in entries {
        let (section, _) = e.section_and_name();
        match out.iter_mut().find(|(s, _)| *s == section) {
            Some((_, list)) => list.push(e),
            None => out.push((section, vec![e])),
        }
    }
    out
}

/// A value as it is written in TOML (a table inline, keys in order).
fn toml_value(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => {
            let items: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {}", toml_value(v))).collect();
            format!("{{ {} }}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Type and valid values, in one phrase.
fn type_and_range(e: &Entry) -> String {
    match e.doc.range {
        "" => e.kind.describe(),
        range => format!("{}; {range}", e.kind.describe()),
    }
}

/// The config `distill init` writes: every key at its default, with its meaning, type
/// and valid values as comments; unset optional keys are commented out with an example.
pub fn init_toml() -> Result<String> {
    let entries = entries()?;
    let mut s = String::from(
        "# distill run configuration, written by `distill init`: every key at its default.\n\
         # Run it with: distill --config FILE. Delete what you do not change; an empty file\n\
         # is a valid config with these same defaults. Reference: docs/configuration.md.\n",
    );
    for (section, keys) in sections(&entries) {
        let (tables, plain): (Vec<&Entry>, Vec<&Entry>) = keys.iter().partition(|e| matches!(e.kind, Kind::Map(_)));
        s.push_str(&format!("\n[{section}]\n"));
        for e in plain {
            init_key(&mut s, e);
        }
        for e in tables {
            s.push_str(&format!("\n# {}\n# {}\n[{}]\n", e.doc.doc, type_and_range(e), e.key));
            if let Some(toml::Value::Table(t)) = &e.default {
                for (k, v) in t {
                    s.push_str(&format!("{k} = {}\n", toml_value(v)));
                }
            }
        }
    }
    Ok(s)
}

fn init_key(s: &mut String, e: &Entry) {
    let (_, name) = e.section_and_name();
    s.push_str(&format!("\n# {}\n", e.doc.doc));
    match (&e.default, &e.doc.unset) {
        (Some(v), _) => {
            s.push_str(&format!("# {}\n", type_and_range(e)));
            s.push_str(&format!("{name} = {}\n", toml_value(v)));
        }
        (None, Some(u)) => {
            s.push_str(&format!("# {}; unset: {}\n", type_and_range(e), u.means));
            s.push_str(&format!("# {name} = {}\n", u.example));
        }
        (None, None) => s.push_str(&format!("# {}\n# {name} =\n", type_and_range(e))),
    }
}

/// A table cell: no line breaks, pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// docs/configuration.md.
pub fn markdown() -> Result<String> {
    let entries = entries()?;
    let mut s = format!(
        "# Configuration reference\n\n\
         <!-- Generated from the config types in crates/distill/src/config/ (names, types and\n     \
         defaults) and config/keys.rs (ranges and meanings). Do not edit by hand; regenerate with\n     \
         {REGENERATE} -->\n\n\
         A run is configured by one TOML file: `distill --config FILE`. Every key is optional; an\n\
         empty file is a valid config, and `distill init FILE` writes one with every key below at\n\
         its default. Unknown keys, wrong types and values out of range are errors that name the\n\
         file and the key, and the whole file is checked before any work starts\n\
         (`distill --config FILE --dry-run` checks it and stops). Relative paths are relative to\n\
         the config file. `configs/tiny.toml` is what the tests run; `configs/small.toml` is the\n\
         demo of the README.\n\n\
         {} keys in {} tables. `[teacher.model]` and `[teacher.train]` (used when the teacher is\n\
         trained rather than loaded) take the same keys as `[student.model]` and `[student.train]`.\n",
        entries.len(),
        sections(&entries).len()
    );
    for (section, keys) in sections(&entries) {
        s.push_str(&format!(
            "\n## `[{section}]`\n\n| key | type and valid values | default | meaning |\n|---|---|---|---|\n"
        ));
        for e in keys {
            let default = match (&e.default, &e.doc.unset) {
                (Some(v), _) => format!("`{}`", toml_value(v)),
                (None, Some(u)) => format!("unset: {}", u.means),
                (None, None) => "unset".into(),
            };
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                e.key,
                cell(&type_and_range(e)),
                cell(&default),
                cell(e.doc.doc)
            ));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_docs_and_every_doc_a_key() -> Result<()> {
        let entries = entries()?;
        for d in super::super::keys::DOCS {
            assert!(
                entries.iter().any(|e| std::ptr::eq(e.doc, d)),
                "keys.rs documents `{}`, which is not a key of the config types",
                d.key
            );
        }
        for e in &entries {
            assert_eq!(
                e.optional,
                e.doc.unset.is_some(),
                "`{}`: an optional key needs `opt(...)` in keys.rs (what unset means), a required one `k(...)`",
                e.key
            );
            assert_eq!(e.default.is_none(), e.optional, "`{}`: default", e.key);
        }
        Ok(())
    }

    #[test]
    fn init_output_parses_to_the_default_config() -> Result<()> {
        let text = init_toml()?;
        let cfg = Config::parse(&text, std::path::Path::new("init.toml"))?;
        assert_eq!(cfg, Config::default());
        for e in entries()? {
            let (_, name) = e.section_and_name();
            assert!(
                text.contains(&format!("\n{name} = "))
                    || text.contains(&format!("\n# {name} = "))
                    || text.contains(&format!("[{}]", e.key)),
                "{}",
                e.key
            );
        }
        Ok(())
    }
}
