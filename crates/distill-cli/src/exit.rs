//! Exit codes by kind of failure. The kind comes from the error's type: the first
//! `distill::Error` in the chain knows its code (`distill::Error::exit_code`); command-line
//! mistakes found here are `distill::Error::Usage`. Nothing is classified by its message.

use distill::error::{exit, EXIT_CODES};

/// A usage error with this message (exit code 2).
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(distill::Error::Usage(msg.into()))
}

/// A library error met while reading a flag's value, reported as a usage error.
pub fn bad_flag(flag: &str, e: impl std::fmt::Display) -> anyhow::Error {
    usage(format!("{flag}: {e}"))
}

/// The exit code of an error: that of the outermost `distill::Error` in its chain, or 1.
pub fn code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<distill::Error>())
        .map_or(exit::FAILURE, distill::Error::exit_code)
}

/// The exit-code table of `distill --help`.
pub fn help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("  {code:>3}  {meaning}\n"));
    }
    s.push_str("Configuration keys: docs/configuration.md, or `distill init` for a commented config.");
    s
}
