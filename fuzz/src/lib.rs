//! Coverage-guided fuzzing of ext2-rs: the targets ([`targets`]) as plain
//! functions, shared by the AFL binary, the replayer and the test suite.

pub mod targets;
