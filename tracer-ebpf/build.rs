//! Rebuild when the `bpf-linker` binary changes: linking this crate needs it, but cargo cannot
//! express a dependency on a binary. `cargo xtask setup` installs it.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH: run `cargo xtask setup` to install it"
        ),
    }
}
