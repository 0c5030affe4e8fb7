//! Helpers shared by the unit tests.

use crate::error::{Error, Result};

/// Runs `f` in rayon pools of 1, 2 and 3 threads and checks that every f32 it returns
/// is bitwise the same: the kernels split work into fixed chunks and add partial sums
/// in a fixed order, so the thread count must not show in a single bit.
pub(crate) fn assert_same_bits_for_any_thread_count(f: impl Fn() -> Result<Vec<Vec<f32>>> + Sync) -> Result<()> {
    let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Invalid(e.to_string()))?
            .install(&f)
    };
    let one = run(1)?;
    for threads in [2, 3] {
        let many = run(threads)?;
        assert_eq!(one.len(), many.len());
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "result {i}: {threads} threads differ from 1"
            );
        }
    }
    Ok(())
}
