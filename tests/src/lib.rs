//! Test harness shared by the component tests (real tap, no KVM) and the boot tests
//! (real guests, directly on KVM or inside the nested rig).

pub mod console;
pub mod driver;
pub mod netns;
pub mod rig;
pub mod skip;
