//! The cluster: the local staging mirror (moved here whole from `cluster.rs`;
//! the next commit splits it by concern).

mod mirror;

pub use mirror::*;
