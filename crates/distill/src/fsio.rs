//! Files written so that a crash never leaves half of one: fsynced writes, atomic
//! replacement, content hashes, and the safetensors header check that runs before a
//! file from outside sizes any allocation. A leaf of the crate.
//!
//! With the `fault-injection` feature (tests only), `DISTILL_CRASH_IN_WRITE=NAME:N`
//! aborts the process half-way through the N-th write of a file named NAME.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

fn checkpoint_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes and fsyncs one file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).at(path)?;
    #[cfg(feature = "fault-injection")]
    crash_point(path, bytes, &mut f);
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// Fault injection for the crash tests, compiled only with the `fault-injection` feature (`tests/e2e.rs`, `scripts/kill-test.sh`): with
/// `DISTILL_CRASH_IN_WRITE=NAME:N`, the N-th write of a file named NAME in this process
/// writes half its bytes, syncs them, and aborts, as a kill or power loss in the middle
/// of a checkpoint write would. A timed SIGKILL lands inside a write only by luck (the
/// writes take milliseconds); this lands there every time. Unset, it costs one lookup.
#[cfg(feature = "fault-injection")]
fn crash_point(path: &Path, bytes: &[u8], f: &mut File) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("DISTILL_CRASH_IN_WRITE").ok()?;
        let (name, n) = v.rsplit_once(':')?;
        Some((name.to_string(), n.parse().ok()?))
    });
    let Some((name, n)) = spec else { return };
    // The file itself, or the temporary sibling `write_file_atomic` writes it through.
    let named = path.file_name().is_some_and(|f| {
        let f = f.to_string_lossy();
        f == name.as_str() || f.starts_with(&format!(".{name}.tmp-"))
    });
    if named && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        let _ = f.write_all(&bytes[..bytes.len() / 2]);
        let _ = f.sync_all();
        eprintln!("DISTILL_CRASH_IN_WRITE: aborting half-way through {}", path.display());
        std::process::abort();
    }
}

/// Writes a file atomically: a temporary sibling, fsync, rename, then fsync
/// the folder. A crash leaves either the old file or the new one, never half;
/// a failed write (a full disk) removes its temporary file and leaves the old one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().to_string());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = write_file(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).at(path)?;
    sync_dir(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    );
    Ok(())
}

/// SHA-256 of a file, in lowercase hex.
pub fn sha256_hex(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).at(path)?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Fsyncs a folder, so that the renames in it are durable.
pub fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not all platforms allow it.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The largest safetensors JSON header accepted (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Checks the 8-byte header length against the file size and a sane bound
/// before the file is read, so a damaged or hostile length never drives an
/// allocation.
pub fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        checkpoint_err(
            path,
            format!("not a valid safetensors file: only {len} bytes (truncated?)"),
        )
    })?;
    let header = u64::from_le_bytes(n);
    if header > MAX_HEADER || header > len - 8 {
        return Err(checkpoint_err(
            path,
            format!(
                "not a valid safetensors file: its header claims {header} bytes but the file has {len} (truncated or corrupt?)"
            ),
        ));
    }
    Ok(())
}

/// Bytes per element of a safetensors dtype name; None for a name the format does not have.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// The tensor shapes of a safetensors file, from its header alone (name -> shape), each
/// checked against the file: a known dtype, and data offsets inside the file whose length
/// is the shape's element count times the dtype's size. Nothing but the header is read,
/// so a model's config can be checked against its weights before they are loaded.
pub fn safetensors_shapes(path: &Path) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    check_safetensors_header(path)?;
    let mut f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).at(path)?;
    let n = u64::from_le_bytes(n); // <= MAX_HEADER and <= len - 8, checked above
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).at(path)?;
    let bad = |msg: String| checkpoint_err(path, format!("not a valid safetensors file: {msg}"));
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header is not a JSON object ({e})")))?;
    let data = len - 8 - n;
    let mut out = std::collections::BTreeMap::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let size = dtype_size(dtype).ok_or_else(|| bad(format!("tensor `{name}` has an unknown dtype {dtype:?}")))?;
        let ints = |key: &str| -> Option<Vec<u64>> { info.get(key)?.as_array()?.iter().map(|x| x.as_u64()).collect() };
        let shape = ints("shape")
            .and_then(|s| {
                s.into_iter()
                    .map(|d| usize::try_from(d).ok())
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
        let bytes = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("tensor `{name}` has an impossible shape {shape:?}")))?;
        let fits = match ints("data_offsets").as_deref() {
            Some(&[start, end]) => start <= end && end <= data && end - start == bytes,
            _ => false,
        };
        if !fits {
            return Err(bad(format!(
                "tensor `{name}` of shape {shape:?} does not fit its data offsets in the file ({len} bytes; truncated or corrupt?)"
            )));
        }
        out.insert(name, shape);
    }
    Ok(out)
}
