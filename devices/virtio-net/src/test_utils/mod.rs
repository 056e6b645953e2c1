// SPDX-License-Identifier: Apache-2.0
//! Test doubles shared by this crate's unit tests, the component tests, the fuzz targets and
//! the benchmarks (feature `test-utils`; always on in this crate's own tests), so that each
//! exists once:
//! - [`ring`]: the driver side of a split virtqueue, from raw field access (what a hostile
//!   driver writes) to a checked driver with a free list.
//! - [`fakes`]: a fault plan and a backend wrapper that fails the k-th attach, detach, ... of
//!   any [`Backend`](crate::Backend), and the tap-like attach state of fake backends.

pub mod fakes;
pub mod ring;
