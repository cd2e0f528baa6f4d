//! Step 4 of the pipeline: where a block comes from — allocation stacks to function, file
//! and line ([`symbolize`]), one useful frame per site ([`site`]), and, without stacks,
//! what a lost block is from its contents ([`contents`]: C++ type, size, samples).

pub mod contents;
pub mod site;
pub mod symbolize;
