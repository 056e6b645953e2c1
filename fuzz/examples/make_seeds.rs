// SPDX-License-Identifier: Apache-2.0
//! Writes the hand-made seeds of every target to `corpus/<target>/seed-<name>`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("ctrl", mqvmm_fuzz::seeds::ctrl()),
        ("queue_pair", mqvmm_fuzz::seeds::queue_pair()),
        ("mmio", mqvmm_fuzz::seeds::mmio()),
        ("pci", mqvmm_fuzz::seeds::pci()),
        ("api", mqvmm_fuzz::seeds::api()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}
