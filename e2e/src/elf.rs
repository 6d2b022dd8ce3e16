//! How an executable is linked, read from its ELF program headers (what `file` and `ldd`
//! look at): a dynamic executable names a program interpreter (`PT_INTERP`, ld.so) that the
//! kernel loads first; a static one has none. A static-pie (`-static-pie`) still has a
//! `PT_DYNAMIC` for its own relocations, but no interpreter, and is `ET_DYN` so the kernel
//! places it at a random address.

use std::path::Path;

use anyhow::{Context, Result, ensure};

/// The linkage of one executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// Loaded by the named interpreter (e.g. /lib64/ld-linux-x86-64.so.2).
    Dynamic { interpreter: String },
    /// No interpreter; `pie` when the kernel randomises where it is loaded (ET_DYN).
    Static { pie: bool },
}

impl std::fmt::Display for Linkage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Linkage::Dynamic { interpreter } => write!(f, "dynamic (interpreter {interpreter})"),
            Linkage::Static { pie: true } => f.write_str("static-pie"),
            Linkage::Static { pie: false } => f.write_str("static"),
        }
    }
}

const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// Reads `path`'s linkage: a 64-bit little-endian ELF executable (x86_64, aarch64).
pub fn linkage(path: &Path) -> Result<Linkage> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&data).with_context(|| format!("{} is not a 64-bit LE ELF executable", path.display()))
}

fn parse(data: &[u8]) -> Result<Linkage> {
    ensure!(data.get(..4) == Some(b"\x7fELF".as_slice()), "no ELF magic");
    ensure!(data.get(4) == Some(&2), "not ELFCLASS64");
    ensure!(data.get(5) == Some(&1), "not little-endian");
    let e_type = u16_at(data, 16)?;
    ensure!(
        e_type == ET_EXEC || e_type == ET_DYN,
        "e_type {e_type}: not an executable"
    );
    let phoff = usize::try_from(u64_at(data, 32)?)?;
    let phentsize = usize::from(u16_at(data, 54)?);
    let phnum = usize::from(u16_at(data, 56)?);
    ensure!(phentsize >= 56, "program header entry of {phentsize} bytes");
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(data, ph)? != PT_INTERP {
            continue;
        }
        let off = usize::try_from(u64_at(data, ph + 8)?)?;
        let size = usize::try_from(u64_at(data, ph + 32)?)?;
        let raw = data
            .get(off..off + size)
            .context("PT_INTERP past the end of the file")?;
        let interpreter = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        return Ok(Linkage::Dynamic { interpreter });
    }
    Ok(Linkage::Static {
        pie: e_type == ET_DYN,
    })
}

fn bytes<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N]> {
    data.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("truncated at byte {at}"))
}

fn u16_at(data: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(bytes(data, at)?))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(bytes(data, at)?))
}

fn u64_at(data: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(bytes(data, at)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself is a dynamic executable (cargo links tests against glibc).
    #[test]
    fn a_dynamic_executable_names_its_interpreter() {
        let me = std::env::current_exe().unwrap();
        match linkage(&me).unwrap() {
            Linkage::Dynamic { interpreter } => {
                assert!(interpreter.contains("ld-linux"), "{interpreter}")
            }
            other => panic!("{} read as {other}", me.display()),
        }
    }

    /// Debian's busybox-static (hack/install-deps.sh) is a static executable.
    #[test]
    fn a_static_executable_has_no_interpreter() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "this test needs /bin/busybox (Debian package busybox-static)"
        );
        assert!(
            matches!(linkage(busybox).unwrap(), Linkage::Static { .. }),
            "{}",
            linkage(busybox).unwrap()
        );
    }

    #[test]
    fn a_script_is_refused() {
        assert!(parse(b"#!/bin/sh\n").is_err());
        assert!(parse(b"\x7fELF\x02\x01").is_err());
    }
}
