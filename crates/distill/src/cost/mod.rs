//! What a run costs: the per-stage ledger (`ledger`), the device's peak FLOP/s that
//! MFU divides by (`peak`), and projections to other scales (`projection`).

pub mod heartbeat;
pub mod ledger;
pub mod peak;
pub mod projection;
