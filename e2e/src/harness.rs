//! (harness helper)
