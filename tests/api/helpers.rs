//! The harness lives in the library (`orion::testkit`) so the benchmarks share it.
pub use orion::testkit::*;
