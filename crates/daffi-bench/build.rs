//! Links `daffi-idle-node` with packed relative relocations where the toolchain can.
//!
//! A position-independent Rust program carries one 24-byte relocation per pointer in its
//! read-only data (about 22,000 for a daffi node), all read by the loader at start: about
//! 0.4 MiB of an idle node's resident memory, for a table used once. `-z
//! pack-relative-relocs` (GNU ld 2.38 and glibc 2.36, or lld) packs them into a few KiB.
//! Scenario E measures an idle node as small as a user can build one; README.md
//! ("Things to know") says how a user's own node program gets the same.
//!
//! The flag is probed first, on a one-line C program linked by the same linker: an older
//! linker ignores it with a warning, and an older glibc cannot load the result. Without
//! it, the program links as before.

use std::path::PathBuf;
use std::process::{Command, Stdio};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The probe runs the linker on the host: a cross build links as before.
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.contains("linux-gnu") || std::env::var("HOST").ok().as_ref() != Some(&target) {
        return;
    }
    if linker_packs_relocations() {
        println!("cargo:rustc-link-arg-bin=daffi-idle-node={FLAG}");
    } else {
        println!(
            "cargo:warning=daffi-idle-node links without packed relative relocations \
             (the linker or C library has none): scenario E's idle node is about 0.4 MiB larger"
        );
    }
}

/// Whether the linker rustc uses (`cc` unless configured) links a program with [`FLAG`]
/// without a warning, and the program runs.
fn linker_packs_relocations() -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let (source, program) = (out.join("relr-probe.c"), out.join("relr-probe"));
    if std::fs::write(&source, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    // The linker a `.cargo/config.toml` names, which need not be `$CC`.
    let linker = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(linker)
        .args(["-fPIE", "-pie", FLAG, "-Wl,--fatal-warnings", "-o"])
        .arg(&program)
        .arg(&source)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    linked && Command::new(&program).status().is_ok_and(|s| s.success())
}
