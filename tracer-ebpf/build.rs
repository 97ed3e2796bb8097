//! Rebuild when the `bpf-linker` binary changes: linking this crate needs it, but cargo cannot
//! express a dependency on a binary. `cargo xtask setup` installs it.
//!
//! And let LLVM write small zero-fills and copies as plain stores. bpf-linker asks it by
//! default to leave memset to a call and expand memcpy its own way, in order (for JITs that
//! pattern-match copies, which Linux's do not need); the memset it then calls (aya-ebpf's)
//! stores one byte per turn of a loop, and every key's padding and every record's unset fields
//! went through it: some 1,000 instructions for each connection started.
fn main() {
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH: run `cargo xtask setup` to install it"
        ),
    }
}
