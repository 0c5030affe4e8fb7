//! `distill init [FILE]`: a complete, commented config, every key at its default.

use std::path::Path;

use crate::exit::usage;

/// The file `distill init` writes when none is named.
pub const DEFAULT_FILE: &str = "distill.toml";

/// Writes the commented default config to `file` (`-`: standard output), refusing to
/// replace an existing file unless `force`.
pub fn init(file: &Path, force: bool) -> anyhow::Result<()> {
    let text = distill::config::reference::init_toml()?;
    if file == Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    if file.exists() && !force {
        return Err(usage(format!(
            "{} already exists; pass --force to replace it, or name another file (`-` prints to standard output)",
            file.display()
        )));
    }
    // Checked before writing: what init writes must load as the default config.
    distill::Config::parse(&text, file)?;
    distill::fsio::write_file_atomic(file, text.as_bytes())?;
    eprintln!(
        "wrote {}: every key at its default, with its meaning; run it with `distill --config {}`",
        file.display(),
        file.display()
    );
    Ok(())
}
