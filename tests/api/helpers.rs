//! The harness lives in the library (`orion::testkit`, cargo feature `testkit`, turned on
//! for tests by the crate's dev-dependency on itself) so the benchmarks share it.
pub use orion::testkit::*;
