//! Step 5 of the pipeline: what kal does with a classified heap — reports in text and
//! JSON ([`report`]) filtered by [`suppress`]ions, and leak tolerance ([`reclaim`]: park or
//! free what two checks agree is lost).

pub mod reclaim;
pub mod report;
pub mod suppress;
