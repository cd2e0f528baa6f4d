//! The subcommands that live in files of their own: options in, library call, output out.

pub mod diff;
