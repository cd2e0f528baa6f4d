//! Step 5 of the pipeline: what kal does with a classified heap — reports in text and
//! JSON ([`report`]) filtered by [`suppress`]ions, leak tolerance ([`reclaim`]: park or
//! free what two checks agree is lost), growth and the time to the memory [`limits`]
//! ([`forecast`]), and Prometheus [`metrics`].

pub mod forecast;
pub mod limits;
pub mod metrics;
pub mod reclaim;
pub mod report;
pub mod suppress;
