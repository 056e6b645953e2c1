//! mqvmm library
