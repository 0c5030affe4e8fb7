//! Data parallelism on the engines the field already runs: MPI between CPU
//! processes and hosts (feature `mpi`, rsmpi over Open MPI or MPICH), NCCL between
//! GPUs (feature `cuda`). `[distributed] backend` picks one; the launcher
//! (`mpirun -np N`, `srun`) decides the world size and each process's rank.
//!
//! Every rank holds a full replica of the student (and of an online teacher) and
//! works on a disjoint slice of each global batch (`train::train`). After backward,
//! gradients are summed over the ranks; the loss is already normalised by the
//! global batch's token count, so the sum is the gradient one process would have
//! computed on the whole batch. Rank 0 alone writes checkpoints, metrics, the
//! ledger and the report.
//!
//! **Reproducibility.** A floating-point sum depends on its order. Every sum here
//! adds the ranks' contributions in rank order, 0 first, so that a run with N ranks
//! is bitwise the same from run to run and every rank ends with bitwise the same
//! result (the replicas never drift apart). On MPI the gradient sum is a
//! reduce-scatter done by hand (an all-to-all, then each rank adds its chunk in rank
//! order) followed by an all-gather: the same 2(N-1)/N x bytes per rank as a ring
//! all-reduce. On NCCL it is `ncclAllReduce`, whose order is fixed for a given
//! topology and world size when the algorithm is pinned (`NCCL_ALGO=Ring`,
//! `NCCL_PROTO=Simple`); see docs/distributed.md.
//!
//! **Shared files.** The run directory must be on a filesystem every rank sees (one
//! host, or NFS/Lustre across hosts): ranks resume from the same checkpoint and read
//! the logit cache rank 0 indexed.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::config::{Backend, DeviceName, DistributedConfig, RunConfig};
use crate::error::{Error, IoContext, Result};

/// The operations data parallelism needs. Every method is collective: all ranks
/// call it, in the same order.
pub trait Collective {
    fn backend(&self) -> Backend;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Every rank's `mine`, indexed by rank.
    fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Element-wise sum over the ranks, added in rank order: every rank gets
    /// bitwise the same result.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.gather_bytes(&bytes)?;
        ordered_sum_f32(&all, buf)
    }

    /// As `sum_f32`, for counters and FLOP totals.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.gather_bytes(&bytes)?;
        for (i, x) in buf.iter_mut().enumerate() {
            let mut s = 0f64;
            for r in &all {
                let b = r
                    .get(8 * i..8 * i + 8)
                    .ok_or_else(|| Error::Distributed("ranks sent sums of different lengths".into()))?;
                s += f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            }
            *x = s;
        }
        Ok(())
    }

    /// The sum over ranks of `t` (same shape on every rank), on `t`'s device.
    fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let shape = t.shape().clone();
        let mut host = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        self.sum_f32(&mut host)?;
        Ok(Tensor::from_vec(host, shape, t.device())?.to_dtype(t.dtype())?)
    }

    fn barrier(&self) -> Result<()> {
        self.gather_bytes(&[]).map(|_| ())
    }

    /// Ends every rank of the job (a rank that returns an error alone would leave the
    /// others waiting in a collective forever).
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

fn ordered_sum_f32(all: &[Vec<u8>], buf: &mut [f32]) -> Result<()> {
    if all.iter().any(|r| r.len() != 4 * buf.len()) {
        return Err(Error::Distributed(
            "ranks sent buffers of different lengths to a sum; are they running the same config and build?".into(),
        ));
    }
    for (i, x) in buf.iter_mut().enumerate() {
        let mut s = 0f32;
        for (r, bytes) in all.iter().enumerate() {
            let b = &bytes[4 * i..4 * i + 4];
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            s = if r == 0 { v } else { s + v };
        }
        *x = s;
    }
    Ok(())
}

/// One process: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn backend(&self) -> Backend {
        Backend::None
    }
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Opens this process's device and joins the job's ranks (`[distributed] backend`,
/// world size and rank from the launcher). In a multi-rank job each rank takes the GPU
/// of its index on its host; a single process keeps the GPU it was given.
pub fn start(run: &RunConfig, dist: &DistributedConfig) -> Result<(candle_core::Device, Box<dyn Collective>)> {
    let mut name = crate::config::parse_device_name(&run.device)?;
    if dist.backend != Backend::None && launcher_world_size().is_some_and(|n| n > 1) {
        if let DeviceName::Cuda(_) = name {
            name = DeviceName::Cuda(rank_device_ordinal());
        }
    }
    let dev = crate::device::open(name)?;
    let comm = match dist.backend {
        Backend::Nccl => {
            let job = launcher_job_id();
            let exchange = nccl_id_exchange(&run.out_dir, &run.name, job.as_deref(), cfg!(feature = "mpi"))?;
            if let NcclIdExchange::File(id_file) = &exchange {
                if let Some(parent) = id_file.parent() {
                    std::fs::create_dir_all(parent).at(parent)?;
                }
            }
            let comm = init_nccl(&dev, &exchange)?;
            comm.barrier()?;
            if let (NcclIdExchange::File(id_file), true) = (&exchange, comm.is_root()) {
                let _ = std::fs::remove_file(id_file);
            }
            comm
        }
        _ => init(dist)?,
    };
    Ok((dev, comm))
}

/// Starts the backend `cfg` names. With "mpi" or "nccl", the world size and the
/// rank come from the launcher; a build without the backend is an error that says
/// how to build it.
pub fn init(cfg: &DistributedConfig) -> Result<Box<dyn Collective>> {
    match cfg.backend {
        Backend::None => {
            if let Some(n) = launcher_world_size().filter(|&n| n > 1) {
                return Err(Error::Distributed(format!(
                    "launched as one of {n} processes (by mpirun or srun), but [distributed] backend is \"none\": \
                     every process would train the whole model alone and write the same run directory; set \
                     backend = \"mpi\" (CPU) or \"nccl\" (GPU), or launch a single process"
                )));
            }
            Ok(Box::new(Single))
        }
        Backend::Mpi => {
            let mpi = init_mpi()?;
            check_mpi_matches_launcher(mpi.rank(), mpi.world(), launcher_rank())?;
            Ok(mpi)
        }
        Backend::Nccl => Err(Error::Distributed(
            "backend \"nccl\" starts with the CUDA device; use distributed::init_nccl".into(),
        )),
    }
}

/// The world size the launcher announced, if any: Open MPI, MPICH/PMI, or a Slurm job
/// step (`srun`: `SLURM_STEP_NUM_TASKS`, not the allocation's `SLURM_NTASKS`, which a
/// batch script's own shell carries too).
pub fn launcher_world_size() -> Option<usize> {
    env_usize(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"])
}

/// This process's rank and the world size, as the launcher announced them.
pub fn launcher_rank() -> Option<(usize, usize)> {
    let rank = env_usize(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"])?;
    Some((rank, launcher_world_size()?))
}

/// An id of the launched job, the same on all its ranks and different for the next
/// job, from the environment; `None` when the launcher sets none (MPICH's Hydra, for one).
pub fn launcher_job_id() -> Option<String> {
    job_id_from(|name| std::env::var(name).ok())
}

/// `launcher_job_id` over any environment: `DISTILL_JOB_ID` (set by the user, the same on
/// every rank); then the ids a launcher makes for each launch, PMIx's namespace (Open MPI
/// 4/5, Slurm's PMIx plugin) and Open MPI's job id; then Slurm's job, step and restart
/// count (a requeued job keeps its job id and numbers its steps from 0 again). The
/// per-launch ids come before Slurm's because several `mpirun`s in one allocation share
/// Slurm's, and a rank `mpirun` starts on its own node may not see the step id at all.
/// Characters other than letters, digits, `.` and `-` become `_`.
fn job_id_from(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let slurm = || {
        env("SLURM_JOB_ID").map(|j| {
            let step = env("SLURM_STEP_ID").unwrap_or_default();
            let restart = env("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".into());
            format!("{j}.{step}.{restart}")
        })
    };
    let id = env("DISTILL_JOB_ID")
        .filter(|v| !v.trim().is_empty())
        .or_else(|| env("PMIX_NAMESPACE"))
        .or_else(|| env("OMPI_MCA_ess_base_jobid"))
        .or_else(slurm)?;
    Some(
        id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect(),
    )
}

/// MPI's rank and world size against the launcher's. An MPI library that cannot attach
/// to the launcher (`srun --mpi=none`, an Open MPI without Slurm support) starts every
/// process as a world of one: each would run the whole job alone and write the same run
/// directory. That is an error, naming the way out.
fn check_mpi_matches_launcher(rank: usize, world: usize, launcher: Option<(usize, usize)>) -> Result<()> {
    match launcher {
        Some((r, w)) if (r, w) != (rank, world) => Err(Error::Distributed(format!(
            "MPI sees this process as rank {rank} of {world}, but the launcher started it as rank {r} of {w}: \
             the MPI library cannot attach to this launcher. Launch with mpirun, or with srun --mpi=pmix \
             (an MPI built with Slurm support); for NCCL, a build without `mpi` with DISTILL_JOB_ID set \
             passes the id through a file instead"
        ))),
        _ => Ok(()),
    }
}

/// How rank 0 hands NCCL's unique id to the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclIdExchange {
    /// Broadcast over MPI (a build with `--features mpi`): nothing on disk.
    Mpi,
    /// Through this file, on a filesystem every rank shares; its name holds the job id,
    /// so that a file left by an earlier job that crashed is never read by this one.
    File(std::path::PathBuf),
}

/// Picks the id exchange: MPI when the build has it; otherwise a file named after
/// `job_id` in `out_dir`. Without either, the ranks could not tell this job's file from
/// a stale one, so that is an error that says what to set.
pub fn nccl_id_exchange(
    out_dir: &std::path::Path,
    run_name: &str,
    job_id: Option<&str>,
    mpi_built: bool,
) -> Result<NcclIdExchange> {
    if mpi_built {
        return Ok(NcclIdExchange::Mpi);
    }
    match job_id {
        Some(job) => Ok(NcclIdExchange::File(out_dir.join(format!(".{run_name}.nccl-id-{job}")))),
        None => Err(Error::Distributed(
            "backend \"nccl\": rank 0 passes NCCL's unique id to the other ranks in a file, and the launcher set \
             no job id to name it (none of SLURM_JOB_ID, PMIX_NAMESPACE, OMPI_MCA_ess_base_jobid), so a file \
             left by an earlier job could be read by this one; set DISTILL_JOB_ID to a value unique to this \
             launch on every rank (e.g. `DISTILL_JOB_ID=$(date +%s%N) mpiexec -n 8 distill ...`), or build \
             with `--features cuda,mpi` to pass the id over MPI"
                .into(),
        )),
    }
}

/// This process's index among the ranks on its host, to pick its GPU.
pub fn launcher_local_rank() -> Option<usize> {
    env_usize(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"])
}

fn env_usize(names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().and_then(|v| v.trim().parse().ok()))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi() -> Result<Box<dyn Collective>> {
    Err(Error::Distributed(
        "[distributed] backend = \"mpi\", but this build has no MPI support; rebuild with \
         `cargo build --release --features mpi` (needs Open MPI or MPICH: Debian `libopenmpi-dev openmpi-bin \
         libclang-dev`), or set backend = \"none\""
            .into(),
    ))
}

#[cfg(feature = "mpi")]
fn init_mpi() -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_backend::Mpi::init()?))
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use mpi::datatype::PartitionMut;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use mpi::Count;

    use super::{Backend, Collective};
    use crate::error::{Error, Result};

    pub struct Mpi {
        // Dropped last: finalises MPI.
        _universe: mpi::environment::Universe,
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| Error::Distributed("MPI was already initialised in this process".into()))?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(Self {
                _universe: universe,
                world,
                rank,
                size,
            })
        }
    }

    fn count(n: usize) -> Result<Count> {
        Count::try_from(n).map_err(|_| Error::Distributed(format!("{n} elements exceed MPI's 2^31 count limit")))
    }

    impl Collective for Mpi {
        fn backend(&self) -> Backend {
            Backend::Mpi
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.size
        }

        fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            let n = self.size;
            let mut lens = vec![0u64; n];
            self.world.all_gather_into(&(mine.len() as u64), &mut lens[..]);
            let counts = lens.iter().map(|&l| count(l as usize)).collect::<Result<Vec<_>>>()?;
            let mut displs = Vec::with_capacity(n);
            let mut at = 0usize;
            for &l in &lens {
                displs.push(count(at)?);
                at += l as usize;
            }
            let mut all = vec![0u8; at];
            {
                let mut part = PartitionMut::new(&mut all[..], counts, &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            let mut out = Vec::with_capacity(n);
            let mut from = 0usize;
            for &l in &lens {
                out.push(all[from..from + l as usize].to_vec());
                from += l as usize;
            }
            Ok(out)
        }

        /// A reduce-scatter by hand (all-to-all, then each rank adds its chunk in rank
        /// order), then an all-gather: 2(N-1)/N of the buffer sent per rank, like a ring
        /// all-reduce, and one fixed order of addition.
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let n = self.size;
            if n == 1 {
                return Ok(());
            }
            let chunk = buf.len().div_ceil(n);
            count(chunk * n)?;
            let mut send = vec![0f32; chunk * n];
            send[..buf.len()].copy_from_slice(buf);
            let mut recv = vec![0f32; chunk * n];
            self.world.all_to_all_into(&send[..], &mut recv[..]);
            // recv[r * chunk + i] is rank r's element (self.rank * chunk + i).
            let mut mine = recv[..chunk].to_vec();
            for r in 1..n {
                for (m, x) in mine.iter_mut().zip(&recv[r * chunk..(r + 1) * chunk]) {
                    *m += *x;
                }
            }
            self.world.all_gather_into(&mine[..], &mut send[..]);
            buf.copy_from_slice(&send[..buf.len()]);
            Ok(())
        }

        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }

        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

/// NCCL between the GPUs of a job: the GPU from the local rank (`cuda:<local rank>`),
/// and NCCL's unique id passed from rank 0 to the others as `exchange` says (rank and
/// world size from MPI, or from the launcher's environment with a file).
#[cfg(feature = "cuda")]
pub fn init_nccl(device: &candle_core::Device, exchange: &NcclIdExchange) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl_backend::Nccl::init(device, exchange)?))
}

/// A build without CUDA cannot start NCCL.
#[cfg(not(feature = "cuda"))]
pub fn init_nccl(_device: &candle_core::Device, _exchange: &NcclIdExchange) -> Result<Box<dyn Collective>> {
    Err(Error::Distributed(
        "[distributed] backend = \"nccl\", but this build has no CUDA support; rebuild with \
         `cargo build --release --features cuda`, or use backend = \"mpi\" on CPUs"
            .into(),
    ))
}

/// The GPU a rank of a multi-process job uses: its local rank on the host, modulo the GPUs it can
/// see (under `srun --gpus-per-task=1` each rank sees exactly one, its own, as cuda:0).
pub fn rank_device_ordinal() -> usize {
    let local = launcher_local_rank().unwrap_or(0);
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        if let Ok(n) = CudaContext::device_count() {
            if n > 0 {
                return local % n as usize;
            }
        }
    }
    local
}

#[cfg(feature = "cuda")]
mod nccl_backend {
    use std::rc::Rc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

    use super::{Backend, Collective, NcclIdExchange};
    use crate::error::{Error, Result};

    pub struct Nccl {
        comm: Rc<Comm>,
        device: Device,
        /// The MPI world the id came over, when it did: kept for the life of the job
        /// (dropping it finalises MPI).
        _mpi: Option<Box<dyn Collective>>,
    }

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Distributed(format!("NCCL {what} failed: {e:?}"))
    }

    impl Nccl {
        pub fn init(device: &Device, exchange: &NcclIdExchange) -> Result<Self> {
            let cuda = device.as_cuda_device().map_err(|_| {
                Error::Distributed("backend \"nccl\" needs --device cuda; use backend = \"mpi\" on CPUs".into())
            })?;
            let (rank, world, id, mpi) = match exchange {
                NcclIdExchange::Mpi => {
                    let mpi = super::init_mpi()?;
                    let (rank, world) = (mpi.rank(), mpi.world());
                    super::check_mpi_matches_launcher(rank, world, super::launcher_rank())?;
                    // Rank 0 sends its id, or nothing when it could not make one, so that
                    // the others learn of the failure instead of waiting in the gather.
                    let made = if rank == 0 { Some(new_id()) } else { None };
                    let mine = match &made {
                        Some(Ok(id)) => id_bytes(id),
                        _ => Vec::new(),
                    };
                    let all = mpi.gather_bytes(&mine)?;
                    if let Some(Err(e)) = made {
                        return Err(e);
                    }
                    let id = id_from_bytes(all.first().map(Vec::as_slice).unwrap_or_default())
                        .ok_or_else(|| Error::Distributed(format!("rank {rank}: rank 0 sent no NCCL id over MPI")))?;
                    (rank, world, id, Some(mpi))
                }
                NcclIdExchange::File(id_file) => {
                    let (rank, world) = super::launcher_rank().ok_or_else(|| {
                        Error::Distributed(
                            "backend \"nccl\" needs a launcher that sets the rank and world size (mpirun, srun): \
                             none of OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID is set"
                                .into(),
                        )
                    })?;
                    (rank, world, file_id(rank, id_file)?, None)
                }
            };
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id).map_err(|e| nccl_err("init", e))?;
            Ok(Self {
                comm: Rc::new(comm),
                device: device.clone(),
                _mpi: mpi,
            })
        }
    }

    fn new_id() -> Result<Id> {
        Id::new().map_err(|e| nccl_err("unique id", e))
    }

    fn id_bytes(id: &Id) -> Vec<u8> {
        id.internal().iter().map(|&c| c as u8).collect()
    }

    /// NCCL's id is 128 bytes; anything else is not one.
    fn id_from_bytes(b: &[u8]) -> Option<Id> {
        if b.len() != 128 {
            return None;
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(b) {
            *d = *s as std::ffi::c_char;
        }
        Some(Id::uninit(internal))
    }

    /// Rank 0 writes a new id to `id_file` (atomically); the others wait for it.
    fn file_id(rank: usize, id_file: &std::path::Path) -> Result<Id> {
        if rank == 0 {
            let id = new_id()?;
            crate::fsio::write_file_atomic(id_file, &id_bytes(&id))?;
            return Ok(id);
        }
        let t0 = std::time::Instant::now();
        loop {
            if let Some(id) = std::fs::read(id_file).ok().and_then(|b| id_from_bytes(&b)) {
                return Ok(id);
            }
            if t0.elapsed() > std::time::Duration::from_secs(600) {
                return Err(Error::Distributed(format!(
                    "rank {rank}: rank 0 wrote no NCCL id to {} within 10 minutes; the run directory must \
                     be on a filesystem all ranks share",
                    id_file.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The all-reduce as a candle op, so it runs on the tensor's device memory. (`Rc`:
    /// NCCL's communicator is neither `Send` nor `Sync`, and each rank uses it from one thread.)
    struct AllReduce(Rc<Comm>);

    impl CustomOp1 for AllReduce {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
        }
        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (from, to) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce needs a contiguous tensor".into()))?;
            let src = s.as_cuda_slice::<f32>()?.slice(from..to);
            let dev = s.device().clone();
            let mut dst: CudaSlice<f32> = dev
                .cuda_stream()
                .alloc_zeros(to - from)
                .map_err(|e| candle_core::Error::Msg(format!("cannot allocate the all-reduce buffer: {e:?}")))?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl Collective for Nccl {
        fn backend(&self) -> Backend {
            Backend::Nccl
        }
        /// Through MPI when the id came over it (MPI_Abort ends every rank); otherwise
        /// the launcher must end the others (`mpirun` does, `srun --kill-on-bad-exit=1`).
        fn abort(&self, code: i32) -> ! {
            match &self._mpi {
                Some(mpi) => mpi.abort(code),
                None => std::process::exit(code),
            }
        }
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world(&self) -> usize {
            self.comm.world_size()
        }

        fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            // Lengths first (8 little-endian bytes per rank), then payloads padded to the
            // longest (at least one byte: CUDA allocations of 0 bytes fail).
            let n = self.world();
            let stream = self.comm.stream();
            let mine_len = stream
                .clone_htod(&(mine.len() as u64).to_le_bytes())
                .map_err(|e| nccl_err("copy", e))?;
            let mut all_lens: CudaSlice<u8> = stream.alloc_zeros(8 * n).map_err(|e| nccl_err("alloc", e))?;
            self.comm
                .all_gather(&mine_len, &mut all_lens)
                .map_err(|e| nccl_err("all_gather", e))?;
            let lens: Vec<usize> = stream
                .clone_dtoh(&all_lens)
                .map_err(|e| nccl_err("copy", e))?
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
                .collect();
            let max = lens.iter().copied().max().unwrap_or(0).max(1);
            let mut send = vec![0u8; max];
            send[..mine.len()].copy_from_slice(mine);
            let send = stream.clone_htod(&send).map_err(|e| nccl_err("copy", e))?;
            let mut recv: CudaSlice<u8> = stream.alloc_zeros(max * n).map_err(|e| nccl_err("alloc", e))?;
            self.comm
                .all_gather(&send, &mut recv)
                .map_err(|e| nccl_err("all_gather", e))?;
            let all = stream.clone_dtoh(&recv).map_err(|e| nccl_err("copy", e))?;
            Ok((0..n).map(|r| all[r * max..r * max + lens[r]].to_vec()).collect())
        }

        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let t = Tensor::from_vec(buf.to_vec(), buf.len(), &self.device)?;
            buf.copy_from_slice(&self.sum_tensor(&t)?.to_vec1::<f32>()?);
            Ok(())
        }

        fn sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
            let f = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
            Ok(f.apply_op1_no_bwd(&AllReduce(self.comm.clone()))?.to_dtype(t.dtype())?)
        }
    }
}

/// Wall time spent inside collectives, for the ledger's communication column.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommTimer {
    pub total: Duration,
}

impl CommTimer {
    pub fn time<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let out = f();
        self.total += t0.elapsed();
        out
    }
}

/// The slice of `items` that `rank` of `world` takes: contiguous, sizes differing by
/// at most one, earlier ranks taking the extra items. Ranks past the items get none.
pub fn shard_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    start.min(len)..end.min(len)
}

#[cfg(test)]
pub(crate) mod threads {
    //! A world of threads in one process, for unit tests of the collective logic
    //! without an MPI installation.
    use std::sync::{Arc, Barrier, Mutex};

    use super::{Backend, Collective};
    use crate::error::Result;

    pub struct Threads {
        rank: usize,
        world: usize,
        slots: Arc<Mutex<Vec<Vec<u8>>>>,
        barrier: Arc<Barrier>,
    }

    /// `world` communicators, one per thread.
    pub fn world(world: usize) -> Vec<Threads> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        (0..world)
            .map(|rank| Threads {
                rank,
                world,
                slots: slots.clone(),
                barrier: barrier.clone(),
            })
            .collect()
    }

    impl Collective for Threads {
        fn backend(&self) -> Backend {
            Backend::Mpi
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.barrier.wait();
            self.slots.lock().expect("lock")[self.rank] = mine.to_vec();
            self.barrier.wait();
            let all = self.slots.lock().expect("lock").clone();
            self.barrier.wait();
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_items_once_in_order() {
        for len in 0..12 {
            for world in 1..6 {
                let ranges: Vec<_> = (0..world).map(|r| shard_range(len, r, world)).collect();
                let flat: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(flat, (0..len).collect::<Vec<_>>(), "len {len} world {world}");
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1);
            }
        }
    }

    /// Sums are added in rank order: bitwise equal on every rank, and equal to the
    /// sequential sum r0 + r1 + r2, not to another association.
    #[test]
    fn sums_are_in_rank_order_and_equal_on_every_rank() {
        let world = threads::world(3);
        let values = [1e8f32, 1.0, -1e8];
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = world
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut buf = vec![values[c.rank()], 2.0 * c.rank() as f32];
                        c.sum_f32(&mut buf).map(|_| buf)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").expect("sum"))
                .collect()
        });
        // In f32, (1e8 + 1) + -1e8 = 0 (1e8 + 1 rounds to 1e8), while the order
        // (1e8 + -1e8) + 1 would give 1.
        assert_eq!(out[0], vec![0.0, 6.0]);
        assert!(out.iter().all(|o| o == &out[0]));
    }

    #[test]
    fn a_backend_missing_from_the_build_is_a_clear_error() {
        #[cfg(not(feature = "mpi"))]
        {
            let e = init(&DistributedConfig { backend: Backend::Mpi })
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("--features mpi"), "{e}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = init_nccl(&candle_core::Device::Cpu, &NcclIdExchange::Mpi)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn the_job_id_comes_from_the_launcher_and_names_the_nccl_id_file() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(job_id_from(env(&[])), None);
        assert_eq!(
            job_id_from(env(&[("SLURM_JOB_ID", "812"), ("SLURM_STEP_ID", "0")])).as_deref(),
            Some("812.0.0")
        );
        // A requeued Slurm job keeps its id and starts its steps at 0 again.
        let requeued = env(&[
            ("SLURM_JOB_ID", "812"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_RESTART_COUNT", "1"),
        ]);
        assert_eq!(job_id_from(requeued).as_deref(), Some("812.0.1"));
        assert_eq!(
            job_id_from(env(&[("PMIX_NAMESPACE", "prterun-host-123@1")])).as_deref(),
            Some("prterun-host-123_1")
        );
        // mpirun inside a Slurm allocation: its own namespace, not the allocation's id.
        let inside = env(&[("PMIX_NAMESPACE", "prterun-host-9@1"), ("SLURM_JOB_ID", "812")]);
        assert_eq!(job_id_from(inside).as_deref(), Some("prterun-host-9_1"));
        let both = env(&[("DISTILL_JOB_ID", "mine"), ("SLURM_JOB_ID", "812")]);
        assert_eq!(job_id_from(both).as_deref(), Some("mine"));

        // MPI started alone under a launcher that made N ranks: refused.
        assert!(check_mpi_matches_launcher(0, 2, Some((0, 2))).is_ok());
        assert!(check_mpi_matches_launcher(0, 2, None).is_ok());
        let e = check_mpi_matches_launcher(0, 1, Some((3, 4))).unwrap_err().to_string();
        assert!(e.contains("rank 3 of 4") && e.contains("srun --mpi=pmix"), "{e}");

        let dir = std::path::Path::new("/runs");
        assert_eq!(
            nccl_id_exchange(dir, "r1", Some("812.0.1"), false).unwrap(),
            NcclIdExchange::File(dir.join(".r1.nccl-id-812.0.1"))
        );
        assert_eq!(nccl_id_exchange(dir, "r1", None, true).unwrap(), NcclIdExchange::Mpi);
        // No job id and no MPI: refused, rather than risk a stale file from an earlier job.
        let e = nccl_id_exchange(dir, "r1", None, false).unwrap_err().to_string();
        assert!(e.contains("DISTILL_JOB_ID") && e.contains("--features cuda,mpi"), "{e}");
    }
}
