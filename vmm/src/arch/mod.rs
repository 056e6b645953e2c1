//! x86_64 specifics: memory map, kernel loading, vCPU state, ACPI.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
