//! Compiles the steering program (bpf/steer.c) for the bpf target with clang (`$CLANG`, else
//! `clang` from PATH) into `$OUT_DIR/steer.o`, which the crate embeds.

use std::env;
use std::io;
use std::path::PathBuf;
use std::process::{exit, Command};

fn fail(msg: &str) -> ! {
    println!("cargo::error={msg}");
    exit(0)
}

fn main() {
    println!("cargo::rerun-if-changed=bpf/steer.c");
    println!("cargo::rerun-if-changed=bpf/steer_map.h");
    println!("cargo::rerun-if-env-changed=CLANG");
    let clang = env::var_os("CLANG").unwrap_or_else(|| "clang".into());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("steer.o");
    // The uapi headers include <asm/types.h>, which Debian keeps under the multiarch directory;
    // clang does not search it for the bpf target.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let asm_include = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(&asm_include)
        .args(["-c", "bpf/steer.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "{} failed ({status}) compiling steering/bpf/steer.c; its messages are above",
            clang.to_string_lossy()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fail(&format!(
            "{} not found: the eBPF steering program needs clang; run resources/install-deps.sh \
             (or: make deps), or set CLANG",
            clang.to_string_lossy()
        )),
        Err(e) => fail(&format!("cannot run {}: {e}", clang.to_string_lossy())),
    }
}
