//! Step 5 of the pipeline: what kal does with a classified heap — a [`report`] filtered by
//! [`suppress`]ions, written by the outputs behind one [`sink::Sink`] trait ([`text`],
//! [`json`], [`pprof`], [`flamegraph`], [`html`]); [`diff`] compares two saved reports;
//! leak tolerance ([`reclaim`]: park or free what two checks agree is lost); growth and the
//! time to the memory [`limits`] ([`forecast`]), and Prometheus [`metrics`].

pub mod diff;
pub mod flamegraph;
pub mod forecast;
pub mod html;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod pprof;
pub mod reclaim;
pub mod report;
pub mod sink;
pub mod suppress;
pub mod text;
