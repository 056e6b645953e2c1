//! Platform devices: the serial console, and the registers through which a guest powers off or
//! resets.

pub mod legacy;
pub mod serial;
