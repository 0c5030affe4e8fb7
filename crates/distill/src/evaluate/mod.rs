//! Held-out evaluation of every model, the report and its charts.

pub mod charts;
