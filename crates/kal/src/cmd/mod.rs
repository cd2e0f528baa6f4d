//! The subcommands that live in files of their own: options in, library call, output out.

pub mod args;
pub mod attach;
pub mod check;
pub mod diff;
pub mod reclaim;
pub mod run;
pub mod trim;
pub mod watch;
