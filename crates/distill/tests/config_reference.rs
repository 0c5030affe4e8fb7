//! docs/configuration.md is generated from the config types; these tests fail when it
//! is out of date or misses a key. Regenerate it with
//! `DISTILL_WRITE_DOCS=1 cargo test -p distill --test config_reference`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::PathBuf;

use distill::config::reference::{self, REGENERATE};

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md")
}

#[test]
fn configuration_md_is_the_generated_reference() {
    let generated = reference::markdown().unwrap();
    if std::env::var_os("DISTILL_WRITE_DOCS").is_some() {
        // Renamed into place, so that the other test never reads a half-written file.
        let tmp = doc_path().with_extension("md.tmp");
        std::fs::write(&tmp, &generated).unwrap();
        std::fs::rename(&tmp, doc_path()).unwrap();
    }
    let committed = std::fs::read_to_string(doc_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md is not what the config types generate (a key, default or doc changed); \
         regenerate it with `{REGENERATE}` and commit it"
    );
}

#[test]
fn configuration_md_lists_every_key_of_the_config_types() {
    let committed = std::fs::read_to_string(doc_path()).unwrap_or_default();
    // Every field of every section, optional ones ([distributed], teacher.hub, ...) included.
    let keys = distill::config::schema::fields::<distill::Config>().unwrap();
    assert!(keys.len() > 80, "the walk found only {} keys", keys.len());
    let missing: Vec<&str> = keys
        .iter()
        .map(|f| f.key.as_str())
        .filter(|k| !committed.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks {missing:?}; document them in crates/distill/src/config/keys.rs and \
         regenerate it with `{REGENERATE}`"
    );
}
