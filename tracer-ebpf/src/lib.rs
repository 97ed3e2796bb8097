#![no_std]

// This file exists so that cargo accepts the crate as a build-dependency of tracer-user (which
// builds the programs in src/main.rs itself, for the BPF target).
