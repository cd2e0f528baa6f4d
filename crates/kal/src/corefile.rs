//! Core files.
